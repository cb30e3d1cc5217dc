"""The language model (backbone.py, LM part): model, data, training, perplexity, generation, saving."""

import json
import math
import random
from collections import Counter

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from m2chat_lite import backbone, world
from m2chat_lite.config import get_config
from m2chat_lite.tokenizer import IGNORE_INDEX, IMAGE_TOKEN
from m2chat_lite.training import TrainConfig
from m2chat_lite.utils import set_seed
from m2chat_lite.world.samples import make_samples

CONFIG = get_config("tiny", lm_hidden_size=32, lm_num_layers=2, lm_num_heads=2, max_seq_len=128)
STORY = [{"role": "user", "content": "tell me a story about a big red circle."}]


@pytest.fixture(scope="module")
def tokenizer():
    return backbone.build_tokenizer(CONFIG, n_per_task=200)


@pytest.fixture(scope="module")
def model(tokenizer):
    set_seed(0)
    return backbone.build_lm(CONFIG, tokenizer).eval()


def fresh_train(tokenizer, steps, seed=0, lr=3e-3):
    return backbone.train_lm(CONFIG, tokenizer, TrainConfig(max_steps=steps, lr=lr, warmup_steps=5, seed=seed,
                                                            log_every=5),
                             n_per_task=30, rows=2, seq_len=128, progress=False)


# --------------------------------------------------------------------------------------------- model


def test_tokenizer_is_deterministic_and_the_model_is_sized_from_it(tokenizer, model):
    again = backbone.build_tokenizer(CONFIG, n_per_task=200)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert model.config.vocab_size == len(tokenizer) <= CONFIG.vocab_size
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_attention_heads) == (32, 2, 2)
    assert model.config.intermediate_size == 4 * 32 and model.config.max_position_embeddings == 128
    assert model.config.pad_token_id == tokenizer.pad_token_id and model.config.eos_token_id == tokenizer.eos_token_id
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    logits = model(input_ids=torch.randint(0, len(tokenizer), (3, 17))).logits
    assert logits.shape == (3, 17, len(tokenizer))
    parts = backbone.count_parameters(model)
    assert parts["total"] == sum(p.numel() for p in model.parameters()) and parts["output head"] == 0
    assert parts["embedding"] == len(tokenizer) * 32


def test_a_preset_without_sizes_needs_an_lm_id(tokenizer):
    with pytest.raises(ValueError, match="lm_id"):
        backbone.build_lm(CONFIG.replace(lm_hidden_size=None), tokenizer)


# --------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("task", world.TASK_NAMES)
def test_labels_never_include_image_positions(tokenizer, task):
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for sample in make_samples(task, 5, seed=1, image_size=16):
        for loss_on in backbone.LOSS_ON:
            enc = backbone.encode_sample(tokenizer, sample, loss_on)
            assert len(enc["labels"]) == len(enc["input_ids"])
            assert all(label == IGNORE_INDEX for token, label in zip(enc["input_ids"], enc["labels"])
                       if token == image_id)
        everything = backbone.encode_sample(tokenizer, sample)
        assert all(label in (token, IGNORE_INDEX) for token, label in zip(everything["input_ids"], everything["labels"]))
        assert everything["labels"][0] == IGNORE_INDEX  # nothing comes before the first token
        assert sum(label != IGNORE_INDEX for label in everything["labels"]) == \
            len(everything["input_ids"]) - 1 - everything["input_ids"].count(image_id)
    with pytest.raises(ValueError, match="loss_on"):
        backbone.encode_sample(tokenizer, sample, "user")


def test_packing_keeps_conversations_apart(tokenizer, model):
    pool = backbone.lm_pool(tokenizer, n_per_task=3, seed=0)
    assert Counter(item["task"] for item in pool) == {task: 3 for task in world.TASK_NAMES}
    batch = backbone.pack(pool, rows=2, seq_len=128, pad_id=tokenizer.pad_token_id)
    ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
    assert ids.shape == labels.shape == positions.shape == (2, 128)
    starts = (positions[0] == 0).nonzero().flatten().tolist()
    assert starts[0] == 0 and len(starts) >= 2
    assert all(labels[0, s] == IGNORE_INDEX for s in starts)  # a conversation's first token is no target
    assert (labels[ids == tokenizer.pad_token_id] == IGNORE_INDEX).all()
    first = pool[0]["input_ids"]
    assert ids[0, :len(first)].tolist() == first
    # attention stays inside each conversation: packed logits equal the logits of each conversation alone
    second = pool[1]["input_ids"]
    with torch.no_grad():
        packed = model(input_ids=ids[:1], position_ids=positions[:1], use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([second])).logits[0]
    assert torch.allclose(packed[len(first):len(first) + len(second)], alone, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        backbone.pack(pool, rows=1, seq_len=8, pad_id=0)


def test_batches_are_a_function_of_the_step(tokenizer):
    pool = backbone.lm_pool(tokenizer, n_per_task=10, seed=0)
    make_batch = backbone.lm_batches(pool, rows=2, seq_len=128, pad_id=tokenizer.pad_token_id, seed=3)
    assert torch.equal(make_batch(7)["input_ids"], make_batch(7)["input_ids"])
    assert not torch.equal(make_batch(7)["input_ids"], make_batch(8)["input_ids"])
    filled = (make_batch(0)["input_ids"] != tokenizer.pad_token_id).float().mean()
    assert filled > 0.6  # packing wastes little


# --------------------------------------------------------------------------------------------- training


def test_the_loss_falls(tokenizer):
    _, result = fresh_train(tokenizer, 50)
    assert result.steps == 50
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 1.0, losses


def test_training_is_deterministic(tokenizer):
    a, _ = fresh_train(tokenizer, 6, seed=1)
    b, _ = fresh_train(tokenizer, 6, seed=1)
    c, _ = fresh_train(tokenizer, 6, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_train_lm_rejects_bad_sizes(tokenizer):
    with pytest.raises(ValueError, match="seq_len=256 is longer"):
        backbone.train_lm(CONFIG, tokenizer, TrainConfig(max_steps=1), seq_len=256, progress=False)
    with pytest.raises(ValueError, match="rows must be a positive int"):
        backbone.train_lm(CONFIG, tokenizer, TrainConfig(max_steps=1), rows=0, progress=False)


# --------------------------------------------------------------------------------------------- evaluation


def test_perplexity_is_the_exponential_of_the_models_own_loss(tokenizer, model):
    samples = make_samples("story", 3, seed=0, image_size=16)
    result = backbone.perplexity(model, tokenizer, samples, batch_size=2)
    total, tokens = 0.0, 0
    for sample in samples:
        enc = backbone.encode_sample(tokenizer, sample)
        n = sum(label != IGNORE_INDEX for label in enc["labels"][1:])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([enc["input_ids"]]), labels=torch.tensor([enc["labels"]])).loss
        total, tokens = total + loss.item() * n, tokens + n
    assert result["tokens"] == tokens
    assert result["nll"] == pytest.approx(total, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
    # an untrained model is about as good as guessing uniformly
    assert 0.5 * len(tokenizer) < result["perplexity"] < 2 * len(tokenizer)


def test_caption_nats_is_the_generators_own_probability():
    pair = world.CaptionPair(world.Scene((world.Obj(0, 0, "circle", "red", "large"),)), "a big red circle at the top left")
    assert backbone.caption_nats(pair) == pytest.approx(math.log(3 * 9 * 30 * 2 * 2 * 4))
    # the collision rate of a large sample estimates E[p(caption)]; it must match the formula's
    pairs = world.caption_pairs(20000, seed=5)
    counts = Counter(p.caption for p in pairs)
    collisions = sum(c * (c - 1) for c in counts.values()) / (len(pairs) * (len(pairs) - 1))
    expected = sum(math.exp(-backbone.caption_nats(p)) for p in pairs) / len(pairs)
    assert collisions == pytest.approx(expected, rel=0.1)


def test_the_caption_share_matches_the_task_generators():
    """VQA and uploaded-picture dialogues open with <image> (never a target); CAPTION_SHARE assumes 40% uploads."""
    opens_with_a_picture = sum(d.turns[0].scene is not None for d in world.dialogues(4000, seed=11)) / 4000
    assert opens_with_a_picture == pytest.approx(0.4, abs=0.025)
    assert all(s.to_messages()[0][0]["content"][0]["type"] == "image" for s in make_samples("vqa", 20, image_size=16))
    assert backbone.CAPTION_SHARE == pytest.approx(1 / (2 + (1 - opens_with_a_picture)), abs=0.01)


def test_caption_entropy_reference(tokenizer):
    samples = make_samples("caption", 20, seed=3, image_size=16)
    ref = backbone.entropy_reference(tokenizer, samples)
    nats = sum(backbone.caption_nats(s) for s in samples)
    assert ref["grammar_nats_per_token"] == pytest.approx(nats / ref["tokens"])
    assert ref["nats_per_token"] == pytest.approx((nats + 20 * math.log(2.6)) / ref["tokens"])
    assert ref["perplexity"] == pytest.approx(math.exp(ref["nats_per_token"]))
    heldout = make_samples("caption", 1, seed=0, split="heldout", image_size=16)[0]
    with pytest.raises(ValueError, match="held-out split"):
        backbone.caption_nats(heldout)
    with pytest.raises(ValueError, match="caption"):
        backbone.caption_nats(make_samples("vqa", 1, image_size=16)[0])


# --------------------------------------------------------------------------------------------- generation


def test_restated_requests_scores_the_words_after_here_is_against_the_asked_scene(tokenizer, model, monkeypatch):
    from m2chat_lite.benchmark import load_benchmark
    from m2chat_lite.data import Image

    dialogues = load_benchmark("dialogue", split="test")[:20]
    requests = [d for d in dialogues if not any(isinstance(s, Image) for s in d.turns[0].content)]
    truth = {d.turns[0].content[0].text: d.turns[1].content[0].text for d in requests}  # "here is <the scene>."
    monkeypatch.setattr(backbone, "generate_text", lambda m, t, messages, **kw: truth[messages[0]["content"]] + "[IMG0]")
    right = backbone.restated_requests(model, tokenizer, limit=20)
    assert right["exact"] == 1.0 and right["n"] == len(requests) > 0 and all(ok for *_, ok in right["replies"])
    wrong = {request: reply.replace("here is", "i drew") for request, reply in truth.items()}  # nothing to parse
    monkeypatch.setattr(backbone, "generate_text", lambda m, t, messages, **kw: wrong[messages[0]["content"]])
    assert backbone.restated_requests(model, tokenizer, limit=20)["exact"] == 0.0
    monkeypatch.undo()
    real = backbone.restated_requests(model, tokenizer, limit=5)  # an untrained LM, decoded for real
    assert 0.0 <= real["exact"] <= 1.0 and len(real["replies"]) == real["n"]
    with pytest.raises(ValueError, match="opens with a request"):
        backbone.restated_requests(model, tokenizer, limit=0)


def test_greedy_generation_is_deterministic_and_sampling_follows_the_seed(tokenizer, model):
    before = torch.get_rng_state()
    greedy = [backbone.generate_text(model, tokenizer, STORY, max_new_tokens=12) for _ in range(2)]
    assert greedy[0] == greedy[1] and greedy[0]
    sampled = [backbone.generate_text(model, tokenizer, STORY, max_new_tokens=12, greedy=False, seed=s)
               for s in (4, 4, 5)]
    assert sampled[0] == sampled[1] != sampled[2]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random state is untouched
    with pytest.raises(ValueError, match="temperature"):
        backbone.generate_text(model, tokenizer, STORY, greedy=False, temperature=0)


def test_a_picture_goes_in_after_the_image_span(tokenizer, model):
    """A model that always writes [IMG3]: after each one, <image> is appended and decoding goes on."""
    forced = backbone.build_lm(CONFIG, tokenizer).eval()
    forced.lm_head = torch.nn.Linear(32, len(tokenizer), bias=True)
    with torch.no_grad():
        forced.lm_head.weight.zero_()
        forced.lm_head.bias.zero_()
        forced.lm_head.bias[tokenizer.convert_tokens_to_ids("[IMG3]")] = 10.0
    reply = backbone.generate_text(forced, tokenizer, STORY, max_new_tokens=6)
    assert reply == "[IMG3]<image>" * 3


# --------------------------------------------------------------------------------------------- saving


def test_save_and_load_give_identical_logits(tmp_path, tokenizer, model):
    folder = backbone.save_lm(model, tokenizer, tmp_path / "lm")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    loaded, loaded_tokenizer = backbone.load_lm(folder)
    ids = torch.randint(0, len(tokenizer), (2, 12))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert backbone.generate_text(loaded, loaded_tokenizer, STORY, max_new_tokens=8) == \
        backbone.generate_text(model, tokenizer, STORY, max_new_tokens=8)
    # saving again replaces the folder whole and leaves nothing else behind
    backbone.save_lm(model, tokenizer, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm"]


def test_a_missing_or_damaged_checkpoint_gives_a_clear_error(tmp_path, tokenizer, model):
    with pytest.raises(FileNotFoundError, match="no LM checkpoint folder at .*nowhere"):
        backbone.load_lm(tmp_path / "nowhere")
    folder = backbone.save_lm(model, tokenizer, tmp_path / "lm")
    (folder / "model.safetensors").rename(tmp_path / "weights")
    with pytest.raises(FileNotFoundError, match=r"lm is incomplete: missing model.safetensors; save it again"):
        backbone.load_lm(folder)
    (tmp_path / "weights").rename(folder / "model.safetensors")

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(ValueError, match=r"lm .*save it again with save_lm"):
        backbone.load_lm(folder)
    (folder / "config.json").write_text(json.dumps(config))

    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cannot load the LM in .*lm"):
        backbone.load_lm(folder)


def test_an_interrupted_save_keeps_the_old_checkpoint(tmp_path, tokenizer, model, monkeypatch):
    folder = backbone.save_lm(model, tokenizer, tmp_path / "lm")
    before = (folder / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        backbone.save_lm(model, tokenizer, folder)
    assert (folder / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm"]


# --------------------------------------------------------------------------------------------- hf-small path


def test_a_pretrained_lm_is_loaded_and_widened_for_m2chat_tokens(tmp_path):
    """The ``lm_id`` path, with a tiny random 'pretrained' checkpoint saved locally (no download)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(world.text_corpus(50), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    pretrained = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", bos_token="<|im_start|>")
    pretrained.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    pretrained.save_pretrained(tmp_path)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(pretrained), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path)

    config = get_config("hf-small", lm_id=str(tmp_path), num_image_tokens=4)
    tokenizer = backbone.build_tokenizer(config)
    model = backbone.build_lm(config, tokenizer)
    assert len(tokenizer) == len(pretrained) + 6  # <image>, [IMG0..3], <|pad|>
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    batch = backbone.pack(backbone.lm_pool(tokenizer, n_per_task=2, seed=0), 2, 256, tokenizer.pad_token_id)
    assert torch.isfinite(backbone.lm_loss(model, batch))
    assert isinstance(backbone.generate_text(model, tokenizer, STORY, max_new_tokens=4), str)
