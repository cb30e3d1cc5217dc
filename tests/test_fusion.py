"""Multimodal prompt fusion (fusion.py): projector, <image> slots, the zero-init gate, training, answering."""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from m2chat_lite import backbone, fusion
from m2chat_lite.config import get_config
from m2chat_lite.data import Sample
from m2chat_lite.encoders import build_clip
from m2chat_lite.tokenizer import IGNORE_INDEX, IMAGE_TOKEN
from m2chat_lite.training import TrainConfig
from m2chat_lite.utils import set_seed
from m2chat_lite.world.samples import make_samples

CONFIG = get_config("tiny", lm_hidden_size=32, lm_num_layers=2, lm_num_heads=2, max_seq_len=128,
                    text_encoder_hidden_size=32, vision_hidden_size=32, vision_num_layers=1,
                    text_encoder_num_layers=1, pooled_dim=32, cond_dim=32)


@pytest.fixture(scope="module")
def tok():
    return backbone.build_tokenizer(CONFIG, n_per_task=200)


@pytest.fixture(scope="module")
def clip(tok):
    set_seed(0)
    return build_clip(CONFIG, tok).eval()


def fresh_lm(tok, seed=0):
    set_seed(seed)
    return backbone.build_lm(CONFIG, tok).eval()


def vqa(n=4, seed=0):
    return make_samples("vqa", n, seed=seed)


def test_projector_pools_the_grid_or_takes_the_class_token():
    features = torch.randn(2, 1 + 64, 32)
    for v in (1, 4, 9, 16):
        assert fusion.VisualProjector(32, 48, v)(features).shape == (2, v, 48)
    cls = fusion.VisualProjector(32, 48, 1)
    assert torch.equal(cls.pool(features), features[:, :1])
    grid = fusion.VisualProjector(32, 48, 4).pool(features)  # 8x8 patches -> 2x2 cells of 4x4 patches
    top_left = features[:, 1:].reshape(2, 8, 8, 32)[:, :4, :4].mean((1, 2))
    assert torch.allclose(grid[:, 0], top_left, atol=1e-6)
    numbered = torch.arange(81.0).reshape(1, 81, 1)  # a 9x9 patch grid numbered row by row -> 3x3 cells
    cells = fusion.pool_patches(torch.cat([torch.zeros(1, 1, 1), numbered], 1), 3)
    assert cells[0, :, 0].tolist() == [10.0, 13.0, 16.0, 37.0, 40.0, 43.0, 64.0, 67.0, 70.0]
    with pytest.raises(ValueError, match="square"):
        fusion.VisualProjector(32, 48, 5)
    with pytest.raises(ValueError, match="square grid"):
        fusion.VisualProjector(32, 48, 4)(torch.randn(1, 1 + 10, 32))


def test_pool_last_projects_every_patch_then_averages_the_cells():
    features = torch.randn(2, 1 + 64, 32)
    first, last = fusion.VisualProjector(32, 48, 4), fusion.VisualProjector(32, 48, 4, pool_last=True)
    last.load_state_dict(first.state_dict())  # the same weights, only the order differs
    patches = last.mlp(features[:, 1:]).reshape(2, 8, 8, 48)
    assert torch.allclose(last(features)[:, 0], patches[:, :4, :4].mean((1, 2)) + last.slot_embeddings[0], atol=1e-5)
    assert not torch.allclose(last(features), first(features), atol=1e-3)  # the MLP is not linear
    cls = fusion.VisualProjector(32, 48, 1, pool_last=True)
    assert torch.allclose(cls(features), cls.mlp(features[:, :1]) + cls.slot_embeddings, atol=1e-6)


def test_expand_image_tokens_repeats_each_placeholder_without_labels():
    ids, labels = fusion.expand_image_tokens([5, 7, 9, 7, 3], [5, -100, 9, -100, 3], image_id=7, tokens_per_image=3)
    assert ids == [5, 7, 7, 7, 9, 7, 7, 7, 3]
    assert labels == [5, -100, -100, -100, 9, -100, -100, -100, 3]
    assert fusion.expand_image_tokens([7], None, 7, 2) == ([7, 7], None)


@pytest.mark.parametrize("lora_rank", [None, 4])
def test_at_step_zero_the_fused_model_is_exactly_the_lm(tok, clip, lora_rank):
    """The zero-init gate (and LoRA's zero-init B) leave the LM's outputs unchanged, pictures or not."""
    reference = fresh_lm(tok)
    model = fusion.build_fused_lm(fresh_lm(tok), clip, tok, tokens_per_image=4, lora_rank=lora_rank).eval()
    items = [fusion.encode_with_pictures(tok, s, 4, 32) for s in make_samples("dialogue", 3, seed=1)]
    batch = fusion.collate(items, tok.pad_token_id)
    assert len(batch["pixel_values"]) >= 1
    with torch.no_grad():
        fused = model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"]).logits
        plain = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert model.gate_value() == 0.0
    assert torch.equal(fused, plain)


def test_an_open_gate_lets_pictures_change_what_follows_them_only(tok, clip):
    model = fusion.build_fused_lm(fresh_lm(tok), clip, tok, tokens_per_image=4, lora_rank=None).eval()
    model.gate.data.fill_(1.0)
    item = fusion.encode_with_pictures(tok, vqa(1)[0], 4, 32)
    ids = torch.tensor([item["input_ids"]])
    first_slot = item["input_ids"].index(tok.convert_tokens_to_ids(IMAGE_TOKEN))
    other = torch.flip(item["pixel_values"], dims=[-1])  # the picture mirrored
    with torch.no_grad():
        a = model(ids, item["pixel_values"]).logits
        b = model(ids, other).logits
    assert torch.equal(a[:, :first_slot], b[:, :first_slot])  # causal: nothing before the picture changes
    assert not torch.allclose(a[:, first_slot:], b[:, first_slot:])


def test_works_with_any_causal_lm_through_inputs_embeds(tok, clip):
    set_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=24, n_layer=1, n_head=2, n_positions=128)).eval()
    model = fusion.build_fused_lm(gpt2, clip, tok, tokens_per_image=1, lora_rank=2).eval()
    item = fusion.encode_with_pictures(tok, vqa(1)[0], 1, 32)
    with torch.no_grad():
        out = model(torch.tensor([item["input_ids"]]), item["pixel_values"]).logits
    assert out.shape == (1, len(item["input_ids"]), len(tok)) and torch.isfinite(out).all()


def test_slot_and_picture_counts_must_agree(tok, clip):
    model = fusion.build_fused_lm(fresh_lm(tok), clip, tok, tokens_per_image=4, lora_rank=None)
    item = fusion.encode_with_pictures(tok, vqa(1)[0], 4, 32)
    ids = torch.tensor([item["input_ids"]])
    with pytest.raises(ValueError, match="expand_image_tokens"):
        model(ids, None)
    with pytest.raises(ValueError, match="4 per picture"):
        model(ids, torch.cat([item["pixel_values"]] * 2))


def test_gen_embeddings_start_as_the_lm_rows_and_replace_them(tok, clip):
    model = fusion.build_fused_lm(fresh_lm(tok), clip, tok, lora_rank=None)
    ids = model.gen_token_ids[None]
    assert torch.equal(model.embed(ids), model.lm.get_input_embeddings()(ids))
    model.gen_embeddings.data += 1.0
    assert torch.allclose(model.embed(ids), model.lm.get_input_embeddings()(ids) + 1.0)


def test_set_trainable_unfreezes_only_the_named_groups(tok, clip):
    model = fusion.build_fused_lm(fresh_lm(tok), clip, tok, lora_rank=4)
    names = fusion.set_trainable(model, ["projector", "gate"])
    assert names and all(n == "gate" or n.startswith("projector.") for n in names)
    names = fusion.set_trainable(model, ["lora"])
    assert names and all("lora_" in n for n in names)
    assert fusion.set_trainable(model, ["gen_embeddings"]) == ["gen_embeddings"]
    with pytest.raises(ValueError, match="unknown parameter groups"):
        fusion.set_trainable(model, ["vision"])


def test_training_opens_the_gate_lowers_the_loss_and_leaves_frozen_weights_alone(tok, clip):
    model = fusion.build_fused_lm(fresh_lm(tok), clip, tok, tokens_per_image=4, lora_rank=4)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()
              if n.startswith("vision_model.") or ("base_layer" in n) or "embed_tokens" in n or n == "gen_embeddings"}
    result = fusion.train_fusion(model, tok, TrainConfig(max_steps=30, lr=3e-3, warmup_steps=3, log_every=5),
                                 batch_size=8, progress=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert model.gate_value() != 0.0
    for name, before in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name


def test_rehearsal_keeps_the_lms_own_words_and_leaves_frozen_weights_alone(tok, clip):
    words = fusion.rehearsal_batches(tok, rows=4, seq_len=CONFIG.max_seq_len, n_per_task=50, seed=99)(0)
    assert words["input_ids"].shape == (4, CONFIG.max_seq_len) and (words["labels"] != IGNORE_INDEX).any()
    losses = {}
    for rows in (0, 2):
        model = fusion.build_fused_lm(fresh_lm(tok), clip, tok, tokens_per_image=4, lora_rank=4)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
        fusion.train_fusion(model, tok, TrainConfig(max_steps=20, lr=1e-2, warmup_steps=2, log_every=5),
                            batch_size=8, progress=False, rehearsal_rows=rows, rehearsal_pool=50,
                            rehearsal_seq_len=CONFIG.max_seq_len)
        assert all(torch.equal(dict(model.named_parameters())[n], p) for n, p in frozen.items())
        with torch.no_grad():
            losses[rows] = float(fusion.rehearsal_loss(model, words))
    assert losses[2] < losses[0]  # rehearsing, the LoRA learns the LM's conversations, not only the answers
    with pytest.raises(ValueError, match="rehearsal_rows"):
        fusion.train_fusion(model, tok, TrainConfig(max_steps=1), rehearsal_rows=-1, progress=False)


def test_fresh_question_batches_are_new_every_step_and_the_same_for_the_same_step(tok):
    make_batch = fusion.vqa_batches(tok, tokens_per_image=4, batch_size=6, pool_size=None, seed=3)
    first, again, second = make_batch(0), make_batch(0), make_batch(1)
    for key in ("input_ids", "labels", "pixel_values"):  # a resumed run sees the same batch for the same step
        assert torch.equal(first[key], again[key]), key
    assert first["input_ids"].shape[0] == 6 and first["pixel_values"].shape == (6, 3, 32, 32)
    assert (first["labels"] != IGNORE_INDEX).any(dim=1).all()  # every row has an answer to learn
    assert not torch.equal(first["pixel_values"], second["pixel_values"])  # new pictures, not a pool's
    # a step's questions are exactly make_samples at that step's training seed, which is never the benchmark's
    from m2chat_lite.benchmark import BENCHMARK_SEED, training_seed
    expected = fusion.collate([fusion.encode_with_pictures(tok, s, 4, 32) for s in
                               make_samples("vqa", 6, seed=training_seed(1, 3))], tok.pad_token_id)
    assert torch.equal(second["input_ids"], expected["input_ids"])
    assert all(training_seed(step, seed) != BENCHMARK_SEED for seed in range(3)
               for step in (0, 1, BENCHMARK_SEED - 1_000_003, BENCHMARK_SEED - 2_000_006))


def test_a_question_pool_smaller_than_a_batch_is_refused(tok):
    with pytest.raises(ValueError, match="pool_size"):
        fusion.vqa_batches(tok, tokens_per_image=4, batch_size=8, pool_size=4)


def test_left_padded_batches_count_positions_from_the_first_real_token(tok):
    items = [{"input_ids": [1, 2, 3], "labels": None, "pixel_values": torch.zeros(0, 3, 32, 32)},
             {"input_ids": [4], "labels": [4], "pixel_values": torch.zeros(0, 3, 32, 32)}]
    batch = fusion.collate(items, pad_id=0, padding_side="left")
    assert batch["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert batch["position_ids"][1].tolist()[-1] == 0 and batch["attention_mask"][1].tolist() == [0, 0, 1]
    assert batch["labels"].tolist() == [[IGNORE_INDEX] * 3, [IGNORE_INDEX, IGNORE_INDEX, 4]]


def test_greedy_replies_answer_in_words_and_match_one_at_a_time(tok, clip):
    model = fusion.build_fused_lm(fresh_lm(tok), clip, tok, tokens_per_image=4, lora_rank=None)
    model.gate.data.fill_(0.5)
    samples = vqa(5, seed=3)
    batched = fusion.greedy_replies(model, tok, samples, max_new_tokens=4, batch_size=5)
    single = [fusion.greedy_replies(model, tok, [s], max_new_tokens=4)[0] for s in samples]
    assert batched == single and all(isinstance(r, str) and IMAGE_TOKEN not in r for r in batched)
    scores = fusion.vqa_accuracy(model, tok, samples)
    assert 0.0 <= scores["accuracy"] <= 1.0 and scores["n"] == 5 and len(scores["replies"]) == 5


def test_vqa_accuracy_splits_the_answers_by_kind_and_by_objects_in_the_picture(monkeypatch):
    samples = make_samples("vqa", 60, seed=5)
    replies = [s.meta["answer"] if i % 3 else "no idea" for i, s in enumerate(samples)]  # every third wrong
    monkeypatch.setattr(fusion, "greedy_replies", lambda *args, **kwargs: replies)
    scores = fusion.vqa_accuracy(None, None, samples)
    right = [i % 3 != 0 for i in range(len(samples))]
    objects = [len(s.meta["scene"]["objects"]) for s in samples]
    assert scores["accuracy"] == pytest.approx(sum(right) / 60) and scores["replies"] == replies
    assert set(scores["per_objects"]) == set(objects) and set(objects) <= {1, 2, 3}
    for n, share in scores["per_objects"].items():
        picked = [ok for ok, m in zip(right, objects) if m == n]
        assert share == pytest.approx(sum(picked) / len(picked))
    for kind, by_objects in scores["per_kind_objects"].items():
        picked = [(ok, m) for ok, m, s in zip(right, objects, samples) if s.meta["kind"] == kind]
        assert set(by_objects) == {m for _, m in picked}
        weighted = sum(share * sum(m == n for _, m in picked) for n, share in by_objects.items())
        assert weighted / len(picked) == pytest.approx(scores["per_kind"][kind])
    # questions without a ShapeWorld scene (real data): by kind only
    plain = [Sample(s.id, s.task, s.turns, {"answer": s.meta["answer"], "kind": s.meta["kind"]})
             for s in samples]
    scores = fusion.vqa_accuracy(None, None, plain)
    assert "per_objects" not in scores and scores["accuracy"] == pytest.approx(sum(right) / 60)


@pytest.mark.parametrize("pool_last", [False, True])
def test_save_and_load_round_trip_shares_the_lm_and_clip_folders(tok, clip, tmp_path, pool_last):
    from m2chat_lite.encoders import save_clip

    backbone.save_lm(fresh_lm(tok), tok, tmp_path / "lm")
    save_clip(clip, tok, tmp_path / "clip")
    lm, _ = backbone.load_lm(tmp_path / "lm")
    model = fusion.build_fused_lm(lm, clip, tok, tokens_per_image=4, lora_rank=4, pool_last=pool_last)
    fusion.train_fusion(model, tok, TrainConfig(max_steps=3, lr=1e-2, warmup_steps=1, log_every=1), batch_size=4,
                        progress=False)
    fusion.save_fused(model, tmp_path / "fusion")
    assert sorted(p.name for p in (tmp_path / "fusion").iterdir()) == ["fusion.safetensors", "fusion_config.json", "lora"]
    assert not (tmp_path / "fusion" / "lora" / "README.md").exists()
    lora_config = (tmp_path / "fusion" / "lora" / "adapter_config.json").read_text()
    assert str(tmp_path) not in lora_config
    # peft keeps target_modules as a set: written sorted, so saving the same LoRA again writes the same file
    targets = json.loads(lora_config)["target_modules"]
    assert targets == sorted(targets) and set(targets) == set(model.lm.peft_config["default"].target_modules)
    assert isinstance(model.lm.peft_config["default"].target_modules, set)  # put back as peft had it
    fusion.save_fused(model, tmp_path / "fusion")
    assert (tmp_path / "fusion" / "lora" / "adapter_config.json").read_text() == lora_config
    again, tok2 = fusion.load_fused(tmp_path / "fusion")
    item = fusion.encode_with_pictures(tok, vqa(1)[0], 4, 32)
    with torch.no_grad():
        a = model.eval()(torch.tensor([item["input_ids"]]), item["pixel_values"]).logits
        b = again(torch.tensor([item["input_ids"]]), item["pixel_values"]).logits
    assert torch.allclose(a, b, atol=1e-5) and again.gate_value() == model.gate_value() != 0
    assert again.projector.pool_last is pool_last
    (tmp_path / "fusion" / "fusion.safetensors").write_bytes(b"damaged")
    with pytest.raises(ValueError, match="cannot load the fused model"):
        fusion.load_fused(tmp_path / "fusion")
    with pytest.raises(FileNotFoundError, match="stage fusion"):
        fusion.load_fused(tmp_path / "nowhere")


def test_pictures_of_any_mode_and_size_become_square_rgb_tensors(tok):
    from PIL import Image as PILImage

    from m2chat_lite.data import Image, Sample, Text, Turn

    odd = Sample("odd", "vqa", [Turn("user", [Image(image=PILImage.new("RGBA", (50, 30))), Text("what is it?")]),
                                Turn("assistant", [Text("red")])])
    gray = Sample("gray", "vqa", [Turn("user", [Image(image=PILImage.new("L", (20, 20))), Text("and this?")]),
                                  Turn("assistant", [Text("blue")])])
    for sample in (odd, gray):
        item = fusion.encode_with_pictures(tok, sample, 4, 32)
        assert item["pixel_values"].shape == (1, 3, 32, 32)
        assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1


def test_gate_closed_silences_the_pictures_and_restores_the_gate(tok, clip):
    model = fusion.build_fused_lm(fresh_lm(tok), clip, tok, tokens_per_image=4, lora_rank=None).eval()
    model.gate.data.fill_(0.7)
    with fusion.gate_closed(model):
        assert model.gate_value() == 0.0
    assert model.gate.item() == pytest.approx(0.7)
    with pytest.raises(RuntimeError):
        with fusion.gate_closed(model):
            raise RuntimeError("boom")
    assert model.gate.item() == pytest.approx(0.7)  # restored even when the block fails


def test_lora_merged_gives_the_same_states_and_restores_the_lm_exactly(tok, clip):
    model = fusion.build_fused_lm(fresh_lm(tok), clip, tok, tokens_per_image=4, lora_rank=4).eval()
    with torch.no_grad():  # a LoRA that does something (peft starts B at zero)
        for name, param in model.lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    batch = fusion.collate([fusion.encode_with_pictures(tok, s, 4, 32) for s in vqa(3)], tok.pad_token_id)
    args = (batch["input_ids"], batch["pixel_values"])
    kwargs = dict(attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    fusion.set_trainable(model, ["gen_embeddings"])  # the LoRA frozen, as in M³FT stage 1
    unmerged = model.hidden_states(*args, **kwargs)
    with fusion.lora_merged(model):
        merged = model.hidden_states(*args, **kwargs)
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if ".base_layer." in n)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # bit for bit, as before
    fusion.set_trainable(model, ["lora"])
    with pytest.raises(ValueError, match="LoRA is training"):
        with fusion.lora_merged(model):
            pass


def test_the_per_sequence_loss_weighs_each_row_once():
    """``shifted_loss(per_sequence=True)``: each labelled row's own mean token loss, averaged over those rows; the
    token mean lets a long row outweigh a short one. Rows with no label are left out; none at all is NaN."""
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.full((3, 6), IGNORE_INDEX)
    labels[0, 1:6] = torch.tensor([1, 2, 3, 4, 5])  # a long answer: five targets
    labels[1, 4] = 7  # a one-token answer
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX,
                                                  reduction="none")
    long_row, short_row = per_token[0].sum() / 5, per_token[1, 3]
    assert torch.allclose(fusion.shifted_loss(logits, labels, per_sequence=True), (long_row + short_row) / 2)
    assert torch.allclose(fusion.shifted_loss(logits, labels), (per_token[0].sum() + short_row) / 6)
    same_lengths = labels.clone()
    same_lengths[1] = labels[0]
    assert torch.allclose(fusion.shifted_loss(logits, same_lengths, per_sequence=True), fusion.shifted_loss(logits, same_lengths))
    assert torch.isnan(fusion.shifted_loss(logits, torch.full((3, 6), IGNORE_INDEX), per_sequence=True))
