"""Interleaved generation (pipeline.py), the HTML export and chat widget (ui.py), `demo` and `chat`.

The system here is tiny and random (built like test_m3ft's), saved in the shipped layout and loaded through
the same `from_pretrained` the shipped system uses; what it writes is nonsense, what the loop does with it
is tested."""

import io
import shutil
from types import SimpleNamespace

import PIL.Image
import pytest
import torch

from m2chat_lite import backbone, diffusion as D, fusion, m3ft
from m2chat_lite.benchmark import load_benchmark
from m2chat_lite.cli import main
from m2chat_lite.config import get_config
from m2chat_lite.data import tensor_to_image
from m2chat_lite.encoders import build_clip, load_clip, save_clip
from m2chat_lite.pipeline import M2ChatPipeline, story_frames, user_message
from m2chat_lite.tokenizer import IMAGE_TOKEN
from m2chat_lite.ui import ChatWidget, page_html, save_html
from m2chat_lite.utils import set_seed
from m2chat_lite.world.samples import scenes_of

CONFIG = get_config("tiny", lm_hidden_size=32, lm_num_layers=2, lm_num_heads=2, max_seq_len=256,
                    text_encoder_hidden_size=32, vision_hidden_size=32, vision_num_layers=1,
                    text_encoder_num_layers=1, pooled_dim=24, cond_dim=32, unet_block_channels=(8, 16),
                    adapter_num_heads=4)
V, K = 4, 4  # visual tokens per picture, [IMG] span length


@pytest.fixture(scope="module")
def system_dir(tmp_path_factory):
    """A random system in the shipped layout: root/{lm,clip,diffusion} and root/stage1."""
    root = tmp_path_factory.mktemp("system")
    set_seed(0)
    tok = backbone.build_tokenizer(CONFIG, n_per_task=200)
    save_clip(build_clip(CONFIG, tok), tok, root / "clip")
    backbone.save_lm(backbone.build_lm(CONFIG, tok), tok, root / "lm")
    clip, _ = load_clip(root / "clip")
    lm, _ = backbone.load_lm(root / "lm")
    generator = D.TinyDiffusionPipeline(D.build_unet(CONFIG), D.build_schedulers()[1], clip, tok,
                                        {"num_inference_steps": 2, "guidance_scale": 1.0})
    generator.save_pretrained(root / "diffusion", text_encoder_dir="../clip")
    fused = fusion.build_fused_lm(lm, clip, tok, tokens_per_image=V, lora_rank=4)
    model = m3ft.build_m2chat(fused, generator, CONFIG, gate_mode="static")
    with torch.no_grad():
        model.adapter.static_gate.fill_(0.3)  # so the gate of a picture with a reference is not 0
    m3ft.save_system(model, root / "stage1", record={"stage": "stage1", "steps": 0})
    return root / "stage1"


@pytest.fixture
def pipe(system_dir):
    return M2ChatPipeline.from_pretrained(system_dir, device="cpu")


def scripted(pipe, tokens):
    """Make the LM write ``tokens`` (names or ids), then end its turn; record each context it read."""
    ids = [pipe.tokenizer.convert_tokens_to_ids(t) if isinstance(t, str) else t for t in tokens]
    seen = []

    def next_token(context, *args):
        seen.append(SimpleNamespace(ids=list(context.ids), pictures=len(context.pictures)))
        return ids.pop(0) if ids else pipe.end_id
    pipe.next_token = next_token
    return seen


def favour(pipe, token_id):
    """Make the LM's logits favour ``token_id`` at every step (a stand-in for an LM that wants to draw)."""
    forward = pipe.model.fused.forward

    def biased(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits[..., token_id] += 1e4
        return out
    pipe.model.fused.forward = biased


def test_the_img_span_is_drawn_and_the_picture_goes_back_into_the_context(pipe):
    word = pipe.tokenizer("red", add_special_tokens=False)["input_ids"][0]
    seen = scripted(pipe, [word, "[IMG0]", word])
    reply = pipe.chat([{"role": "user", "content": "tell me a story about a red circle."}])
    kinds = [s["type"] for s in reply.message["content"]]
    assert kinds == ["text", "image", "text"] and reply.finished and reply.tokens == 1 + K + 1
    picture = reply.images[0]
    assert picture.size == (32, 32) and picture.mode == "RGB"
    assert reply.gates == [0.0]  # no picture before it: the visual branch is gated out
    before, after = seen[1], seen[2]
    assert before.pictures == 0 and after.pictures == 1  # the drawn picture is in the context now
    image_id = pipe.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    span = pipe.tokenizer.convert_tokens_to_ids([f"[IMG{k}]" for k in range(K)])
    assert after.ids[len(before.ids):] == span + [image_id] * V  # [IMG0..K-1], then the picture's V slots


def test_the_picture_is_what_the_adapter_and_generator_make_of_the_span(pipe):
    scripted(pipe, ["[IMG0]"])
    messages = [{"role": "user", "content": "draw a red circle."}]
    reply = pipe.chat(messages, seed=5)
    context = pipe.encode(messages)
    context.ids += pipe.gen_ids
    batch = pipe._batch(context)
    batch["reference"], batch["has_reference"] = torch.zeros(1, 3, 32, 32), torch.tensor([False])
    with torch.no_grad():
        condition = pipe.model.condition(batch)
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5 * 1_000_003))
    expected = pipe.generator(prompt_embeds=condition.prompt_embeds, pooled_prompt_embeds=condition.pooled,
                              latents=noise)[0]
    assert reply.images[0].tobytes() == expected.tobytes()


def test_a_picture_in_the_conversation_is_the_reference_and_opens_the_gate(pipe):
    scripted(pipe, ["[IMG0]"])
    upload = PIL.Image.new("RGBA", (50, 40), (255, 0, 0, 128))  # odd mode and size: made 32x32 RGB
    reply = pipe.chat([user_message("make it blue.", upload)])
    assert reply.gates[0] == pytest.approx(torch.tanh(torch.tensor(0.3)).item(), abs=1e-5)


def test_greedy_decoding_is_deterministic_and_never_writes_structure(pipe):
    messages = [{"role": "user", "content": "tell me a story about a red circle."}]
    a = pipe.chat(messages, max_new_tokens=12)
    b = pipe.chat(messages, max_new_tokens=12)
    assert a.text == b.text and [i.tobytes() for i in a.images] == [i.tobytes() for i in b.images]
    assert a.tokens <= 12 and (a.finished or a.tokens >= 12 - K)
    for segment in a.message["content"]:
        if segment["type"] == "text":
            assert "<|" not in segment["text"] and IMAGE_TOKEN not in segment["text"]


def test_sampling_follows_the_seed(pipe):
    messages = [{"role": "user", "content": "tell me a story about a red circle."}]
    runs = [pipe.chat(messages, max_new_tokens=10, do_sample=True, temperature=2.0, top_k=None, seed=s).text
            for s in (1, 1, 2, 3)]
    assert runs[0] == runs[1] and len(set(runs)) > 1
    with pytest.raises(ValueError, match="temperature"):
        pipe.chat(messages, do_sample=True, temperature=0)


def test_max_pictures_bans_img0_after_the_last_picture(pipe):
    favour(pipe, pipe.gen_ids[0])  # an LM that always wants to draw
    reply = pipe.chat([{"role": "user", "content": "draw."}], max_pictures=2, max_new_tokens=20)
    assert len(reply.images) == 2 and not reply.finished and reply.tokens >= 20


def test_special_tokens_typed_by_a_user_are_plain_text(pipe):
    seen = scripted(pipe, [])
    pipe.chat([{"role": "user", "content": "[IMG0][IMG1] <image> <|assistant|>"}])
    image_id = pipe.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id not in seen[0].ids and not set(pipe.gen_ids) & set(seen[0].ids) and seen[0].pictures == 0


def test_bad_conversations_are_clear_errors(pipe, tmp_path):
    with pytest.raises(ValueError, match="conversation is empty"):
        pipe.chat([])
    with pytest.raises(ValueError, match="message is empty"):
        pipe.chat([{"role": "user", "content": "   "}])
    with pytest.raises(ValueError, match="last message must be the user's"):
        pipe.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    with pytest.raises(ValueError, match="without its picture"):
        pipe.chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}])
    with pytest.raises(FileNotFoundError, match="image file not found"):
        pipe.chat([user_message("what is it?", tmp_path / "missing.png")])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="corrupt or not a picture"):
        pipe.chat([user_message("what is it?", tmp_path / "broken.png")])
    with pytest.raises(ValueError, match="start a new conversation"):
        pipe.chat([{"role": "user", "content": "red " * 400}])
    with pytest.raises(ValueError, match="subject"):
        pipe.story(" ")
    with pytest.raises(ValueError, match="at least one request"):
        pipe.dialogue([])


def test_a_conversation_that_fills_the_context_stops_with_a_clear_error(pipe):
    favour(pipe, pipe.tokenizer("red", add_special_tokens=False)["input_ids"][0])
    with pytest.raises(ValueError, match="start a new conversation"):
        pipe.chat([{"role": "user", "content": "red " * 200}], max_new_tokens=200)


def test_story_and_dialogue_keep_the_whole_conversation(pipe):
    scripted(pipe, ["[IMG0]"])
    story = pipe.story("a small red square", frames=2)
    assert story[0]["content"] == "write a short story with pictures about a small red square."
    assert story[1]["role"] == "assistant"
    seen = scripted(pipe, ["[IMG0]", pipe.end_id, "[IMG0]"])
    dialogue = pipe.dialogue(["draw a red circle.", "make it blue."])
    assert [m["role"] for m in dialogue] == ["user", "assistant", "user", "assistant"]
    assert seen[2].pictures == 1  # the second reply began reading the first reply's picture
    assert len(dialogue[3]["content"]) == 1 and dialogue[3]["content"][0]["gate"] > 0  # an edit of it


def test_save_pretrained_writes_a_self_contained_system(pipe, tmp_path):
    folder = pipe.save_pretrained(tmp_path / "saved")
    assert {p.name for p in folder.iterdir()} == {"lm", "clip", "diffusion", "fused", "adapter", "m2chat.json"}
    moved = shutil.move(str(folder), str(tmp_path / "elsewhere"))
    assert not list(tmp_path.glob(".saved*"))  # no temporary folder left behind
    again = M2ChatPipeline.from_pretrained(moved)
    messages = [{"role": "user", "content": "draw a red circle."}]
    a, b = pipe.chat(messages, max_new_tokens=8), again.chat(messages, max_new_tokens=8)
    assert a.text == b.text and [i.tobytes() for i in a.images] == [i.tobytes() for i in b.images]
    with pytest.raises(FileNotFoundError, match="no M²Chat system"):
        M2ChatPipeline.from_pretrained(tmp_path / "nowhere")


def test_the_html_page_embeds_the_pictures_and_escapes_the_words(pipe, tmp_path):
    scripted(pipe, ["[IMG0]"])
    story = pipe.story("a red circle")
    story[0]["content"] = "a <script>alert(1)</script> story"
    path = save_html([("A story", story), ("Another", story)], tmp_path / "page.html", title="demo")
    text = path.read_text()
    assert text.count("data:image/png;base64,") == 2 and "<script>" not in text and "&lt;script&gt;" in text
    assert "gate 0.00" in text and [p.name for p in tmp_path.iterdir()] == ["page.html"]
    assert "data:image/png" in page_html([("one", [user_message("look", PIL.Image.new("L", (8, 8)))])])
    with pytest.raises(ValueError, match="no picture"):
        page_html([("bad", [{"role": "user", "content": [{"type": "image"}]}])])


def test_the_chat_widget_runs_headless(pipe):
    scripted(pipe, ["[IMG0]"])
    chat = ChatWidget(pipe)
    reply = chat.send("draw a red circle.")
    assert len(chat.messages) == 2 and len(reply.images) == 1 and "data:image/png" in chat.transcript.value
    buffer = io.BytesIO()
    PIL.Image.new("P", (20, 30)).save(buffer, format="PNG")
    scripted(pipe, [])
    chat.send("what is this?", buffer.getvalue())
    assert chat.transcript.value.count("data:image/png") == 2 and len(chat.messages) == 4
    with pytest.raises(ValueError, match="not a picture"):
        chat.send("and this?", b"garbage")
    chat.text.value = "  "
    chat._send_from_widgets()  # an empty message from the widgets: said in the status line, nothing added
    assert "empty" in chat.status.value and len(chat.messages) == 4
    chat.reset()
    assert chat.messages == []


def test_demo_and_chat_commands(system_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo.html"
    assert main(["demo", "--model", str(system_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "a story:" in printed and "a dialogue:" in printed and str(out) in printed
    assert out.read_text().count("<h2>") == 2
    assert main(["demo", "--model", str(tmp_path / "nowhere"), "--out", str(out)]) == 1
    assert "no M²Chat system" in capsys.readouterr().err

    lines = iter(["/picture " + str(tmp_path / "missing.png"), "/help", "draw a red circle.", "/new", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(system_dir), "--out", str(tmp_path / "pictures")]) == 0
    printed = capsys.readouterr().out
    assert "cannot use that picture" in printed and "/picture PATH" in printed and "m2chat>" in printed
    assert "a new conversation" in printed


def test_story_frames_pair_each_picture_with_the_words_before_it():
    red, blue = PIL.Image.new("RGB", (4, 4), "red"), PIL.Image.new("RGB", (4, 4), "blue")
    message = {"role": "assistant", "content": [
        {"type": "text", "text": "a red one."}, {"type": "image", "image": red},
        {"type": "image", "image": blue}, {"type": "text", "text": "the end."}]}
    sentences, pictures = story_frames(message)
    assert sentences == ["a red one.", ""] and pictures == [red, blue]


def test_generate_can_draw_through_the_whole_system(system_dir, tmp_path, capsys):
    out = tmp_path / "pictures"
    assert main(["generate", "--prompt", "a red circle", "--n", "2", "--via", "m2chat", "--model", str(system_dir),
                 "--out", str(out)]) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 2 and PIL.Image.open(files[0]).size == (32, 32)
    assert files[0].read_bytes() != files[1].read_bytes()  # each from its own noise


def test_the_shipped_demo_tells_a_story_with_pictures(tmp_path, capsys):
    """The README's main job, on the shipped system, as a user runs it."""
    out = tmp_path / "demo.html"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    story = printed.split("a story:")[1].split("a dialogue:")[0]
    assert story.count("[picture]") >= 2 and "square" in story
    page = out.read_text()
    assert page.count("data:image/png") >= 5 and "An illustrated story" in page


def test_illustrate_draws_the_missing_pictures_with_the_words_held_fixed(pipe):
    from m2chat_lite.evaluation import messages_of
    from m2chat_lite.world.samples import make_samples

    story = make_samples("story", 1, seed=3)[0]
    done = pipe.illustrate(messages_of(story), seed=2)
    drawn = [s for s in done[1]["content"] if s["type"] == "image"]
    assert len(drawn) == len(story.images()) and all(s["image"].size == (32, 32) for s in drawn)
    assert drawn[0]["gate"] == 0.0 and all(g["gate"] > 0 for g in drawn[1:])  # the frame before is the reference
    words = [s["text"] for s in done[1]["content"] if s["type"] == "text"]
    assert words == [seg.text for seg in story.turns[1].content if hasattr(seg, "text")]
    # a caption pair illustrated is the picture `generate --via m2chat` draws: the same context, seed and noise
    messages = [{"role": "user", "content": "a red circle"}, {"role": "assistant", "content": [{"type": "image"}]}]
    context = pipe.encode(messages[:1])
    context.ids += pipe.gen_ids
    expected, _ = pipe.draw(context, seed=5 * 1_000_003)
    assert pipe.illustrate(messages, seed=5)[1]["content"][0]["image"].tobytes() == \
        tensor_to_image(expected).tobytes()
    with pytest.raises(ValueError, match="must follow a user turn"):
        pipe.illustrate([{"role": "assistant", "content": [{"type": "image"}]}])


def test_eval_runs_every_suite_on_a_few_samples(system_dir, tmp_path, capsys):
    import json

    out = tmp_path / "scores.json"
    assert main(["eval", "--model", str(system_dir), "--suite", "all", "--limit", "2", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"meta", "t2i", "story", "dialog", "chat", "vqa"}
    assert results["t2i"]["n"] == 2 and 0 <= results["t2i"]["m2chat"]["exact"] <= 1
    assert results["t2i"]["teacher"]["fid_tiny_clip"] >= 0 and results["story"]["frames"] >= 4
    assert 0 <= results["story"]["consistency"] <= 1 and results["dialog"]["edits"] >= 1
    by_kind = results["dialog"]["edit_success_by_kind"]
    assert by_kind and set(by_kind) <= {"move", "recolor", "resize", "add"}
    assert set(results["dialog"]["edit_success_by_objects"]) <= {"1", "2", "3"}
    assert 0 <= results["vqa"]["exact"] <= 1 and results["meta"]["seed"] == 0
    assert results["vqa"]["exact_by_objects"] and set(results["vqa"]["exact_by_objects"]) <= {"1", "2", "3"}
    assert results["chat"]["first_pictures"] + results["chat"]["edits"] >= 2  # each picture turn answered freely
    assert 0 <= results["chat"]["reply_words_exact"] <= 1
    assert results["meta"]["model"] == str(system_dir) and results["meta"]["threads"] >= 1
    printed = capsys.readouterr().out
    assert "== story (2 samples" in printed and "consistency" in printed and "own_frames_per_story" in printed
    story = results["story"]
    assert story["own_stories"] == 2 and sum(story["own_frame_counts"].values()) == 2
    assert story["own_frames_per_story"] == sum(int(k) * v for k, v in story["own_frame_counts"].items()) / 2
    assert main(["eval", "--model", str(system_dir), "--limit", "0"]) == 2


def test_a_story_in_the_systems_own_words_is_scored_against_its_own_sentences():
    from m2chat_lite.evaluation import own_story_scores, own_words_summary

    sample = load_benchmark("story", split="test")[0]
    sentences = [segment.text for segment in sample.turns[1].content if hasattr(segment, "text")]
    pictures = [p.load() for p in sample.images()]
    truth = own_story_scores(sentences, pictures)
    assert truth == {"frames": len(pictures), "read": len(pictures), "exact": [1.0] * len(pictures), "consistency": 1.0}
    swapped = own_story_scores(sentences, pictures[:1] + pictures[:1] + pictures[2:])  # frame 2 repeats frame 1
    assert swapped["exact"][1] == 0.0 and swapped["exact"][2:] == [1.0] * (len(pictures) - 2)
    unread = own_story_scores(sentences[:1] + ["the dragon flies away."] + sentences[2:], pictures)
    assert unread["read"] == 1 and unread["exact"] == [1.0] and unread["consistency"] is None
    summary = own_words_summary([truth, unread])
    assert summary["own_stories"] == 2 and summary["own_frame_counts"] == {str(len(pictures)): 2}
    assert summary["own_frames_read"] == (len(pictures) + 1) / (2 * len(pictures))
    assert summary["own_alignment_exact"] == 1.0 and summary["own_consistency"] == 1.0
    assert own_words_summary([]) == {}


def test_picture_kinds_name_what_made_each_picture_of_a_dialogue():
    from m2chat_lite.evaluation import picture_kinds

    dialogues = load_benchmark("dialogue", split="test")
    assert picture_kinds(dialogues[0]) == ["upload", "resize"]  # "here is my picture." then "make the circle bigger."
    assert picture_kinds(dialogues[2]) == ["request", "resize", "resize"]
    for sample in dialogues:
        kinds = picture_kinds(sample)
        assert len(kinds) == len(scenes_of(sample)) and kinds[0] in ("upload", "request")
        assert set(kinds[1:]) <= {"move", "recolor", "resize", "add"}


class _Replying:
    """A stand-in system for eval_chat's scoring: its reply to a benchmark conversation is the benchmark's own next
    turn (its words and, if ``draw``, its picture), so every score is known in advance."""

    def __init__(self, sample, draw: bool = True):
        self.sample, self.draw, self.seeds = sample, draw, []

    def chat(self, messages, seed=0):
        from m2chat_lite.data import Image
        from m2chat_lite.pipeline import Reply

        self.seeds.append(seed)
        turn = self.sample.turns[len(messages)]
        content = [{"type": "image", "image": s.load(), "gate": 0.0} if isinstance(s, Image)
                   else {"type": "text", "text": s.text} for s in turn.content if self.draw or not isinstance(s, Image)]
        return Reply({"role": "assistant", "content": content}, True, 0, 0.0)


def test_eval_chat_scores_the_systems_own_replies_against_the_scenes_the_user_asked_for():
    from m2chat_lite.evaluation import eval_chat

    dialogues = load_benchmark("dialogue", split="test")
    request, upload = dialogues[8], dialogues[0]  # a request, a resize, an add; an upload, then a resize
    right = _Replying(request)
    scores = eval_chat(right, [request], seed=1, progress=False)
    assert scores["first_pictures"] == 1 and scores["edits"] == 2 and right.seeds == [1_000_003, 1_000_004, 1_000_005]
    assert scores["first_picture_exact"] == scores["edit_success"] == scores["edit_preservation"] == 1.0
    assert scores["reply_words_exact"] == scores["replies_with_a_picture"] == 1.0
    assert set(scores["edit_success_by_kind"]) == {"resize", "add"}
    uploaded = _Replying(upload)
    scores = eval_chat(uploaded, [upload], progress=False)  # "i see ..." draws nothing, so it is not scored
    assert scores["first_pictures"] == 0 and scores["edits"] == 1 and uploaded.seeds == [1]
    assert scores["edit_success"] == scores["edit_preservation"] == 1.0
    silent = eval_chat(_Replying(request, draw=False), [request], progress=False)  # the right words, no picture
    assert silent["replies_with_a_picture"] == silent["first_picture_exact"] == silent["edit_success"] == 0.0
    assert silent["edit_preservation"] == 0.0 and silent["reply_words_exact"] == 1.0 and silent["edits"] == 2


class _Illustrating:
    """A stand-in system for eval_dialog's scoring: it illustrates a benchmark dialogue with the benchmark's own
    pictures, so every edit is right."""

    def __init__(self, sample):
        self.sample = sample

    def illustrate(self, messages, seed=0):
        from m2chat_lite.evaluation import messages_of

        done = messages_of(self.sample, assistant_pictures=True)
        for message in done:
            for segment in message["content"]:
                if segment["type"] == "image" and message["role"] == "assistant":
                    segment["gate"] = 0.5
        return done


def test_eval_dialog_splits_edits_by_the_picture_they_start_from():
    from m2chat_lite.evaluation import eval_dialog

    dialogues = load_benchmark("dialogue", split="test")
    request, upload = dialogues[8], dialogues[0]  # a request, a resize, an add; an upload, then a resize
    scores = eval_dialog(_Illustrating(request), [request], progress=False)
    assert scores["first_pictures"] == 1 and scores["edits"] == 2 and scores["edit_success"] == 1.0
    assert scores["edit_success_by_reference"] == {"first drawing": 1.0, "earlier edit": 1.0}
    assert set(scores["edit_preservation_by_reference"]) == {"first drawing", "earlier edit"}
    scores = eval_dialog(_Illustrating(upload), [upload], progress=False)
    assert scores["first_pictures"] == 0 and scores["edits"] == 1
    assert scores["edit_success_by_reference"] == {"upload": 1.0} and scores["gate_mean"] == 0.5


def test_the_two_step_baseline_draws_from_the_words_before_each_picture(pipe):
    from m2chat_lite.evaluation import illustrate_two_step, messages_of
    from m2chat_lite.world.samples import make_samples

    story = make_samples("story", 1, seed=3)[0]
    done = illustrate_two_step(pipe, messages_of(story), seed=1)
    drawn = [s for s in done[1]["content"] if s["type"] == "image"]
    assert len(drawn) == len(story.images()) and all(s["gate"] is None for s in drawn)
    first_words = story.turns[1].content[0].text
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1 * 1_000_003))
    assert drawn[0]["image"].tobytes() == pipe.generator(prompt=[first_words], latents=noise)[0].tobytes()
