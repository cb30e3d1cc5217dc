"""Tiny CLIP: shapes, the contrastive loss, training, retrieval, save and load."""

import pytest
import torch

from m2chat_lite.config import get_config
from m2chat_lite.encoders import (build_clip, caption_batch, contrastive_loss, encode_images, encode_text,
                                  load_clip, retrieval_accuracy, save_clip, tokenize_captions, train_clip)
from m2chat_lite.tokenizer import train_tokenizer
from m2chat_lite.training import TrainConfig
from m2chat_lite.world import text_corpus

CONFIG = get_config("tiny", text_encoder_hidden_size=32, vision_hidden_size=32, vision_num_layers=1,
                    text_encoder_num_layers=1, pooled_dim=32, cond_dim=32)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(text_corpus(100, seed=0), vocab_size=400, num_image_tokens=4)


def test_shapes(tok):
    clip = build_clip(CONFIG, tok)
    pictures, captions = caption_batch(3, seed=1, image_size=32)
    hidden, pooled = encode_text(clip, tok, captions)
    assert hidden.shape == (3, CONFIG.cond_seq_len, 32) and pooled.shape == (3, 32)
    # the encoder runs where its weights are; `device` only says where the answer goes (here a device
    # holding no data at all: asking the CPU-held encoder to compute there would fail)
    elsewhere = encode_text(clip, tok, captions, device="meta")
    assert all(t.device.type == "meta" for t in elsewhere) and elsewhere[0].shape == hidden.shape
    patches, pooled_images = encode_images(clip, pictures)
    assert patches.shape == (3, 1 + (32 // CONFIG.vision_patch_size) ** 2, 32) and pooled_images.shape == (3, 32)


def test_tokenize_captions_pads_truncates_and_escapes(tok):
    ids, mask = tokenize_captions(tok, ["a red circle", "word " * 100, "<image> [IMG0]"], max_length=12)
    assert ids.shape == (3, 12)
    assert ids[0, 0] == tok.bos_token_id and ids[0, mask[0].sum() - 1] == tok.eos_token_id
    assert mask[1].all() and ids[1, -1] == tok.eos_token_id  # truncated, keeps the end token
    assert tok.convert_tokens_to_ids("<image>") not in ids[2].tolist()


def test_contrastive_loss_is_low_when_pairs_match():
    e = torch.eye(4)
    scale = torch.tensor(4.0)
    assert contrastive_loss(e, e, scale) < 0.1 < contrastive_loss(e, e.roll(1, 0), scale)


def test_training_learns_to_match_pictures_and_captions(tok):
    clip, result = train_clip(CONFIG, tok, TrainConfig(max_steps=60, lr=3e-3, warmup_steps=5, log_every=10),
                              batch_size=32, progress=False)
    assert result.history[-1]["loss"] < 0.8 * result.history[0]["loss"]
    pictures, captions = caption_batch(100, seed=12345, image_size=32)
    scores = retrieval_accuracy(clip, tok, pictures, captions, n_candidates=20)
    assert scores["image_to_text"] > 0.2  # chance is 0.05


def test_save_load_round_trip_and_errors(tok, tmp_path):
    clip = build_clip(CONFIG, tok).eval()
    save_clip(clip, tok, tmp_path / "clip")
    loaded, loaded_tok = load_clip(tmp_path / "clip")
    captions = ["a big red circle in the center"]
    assert torch.allclose(encode_text(clip, tok, captions)[1], encode_text(loaded, loaded_tok, captions)[1], atol=1e-5)
    with pytest.raises(FileNotFoundError, match="holds no tiny CLIP"):
        load_clip(tmp_path / "missing")
    (tmp_path / "clip" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot load tiny CLIP"):
        load_clip(tmp_path / "clip")
    other = build_clip(get_config("tiny", text_encoder_hidden_size=16, cond_dim=16), tok)
    save_clip(other, tok, tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text((tmp_path / "clip" / "config.json").read_text())
    with pytest.raises(ValueError, match="do not match"):
        load_clip(tmp_path / "other")


def test_hard_negatives_are_the_same_objects_in_other_cells():
    import random

    from m2chat_lite.encoders import moved_scene
    from m2chat_lite.world import caption_pairs, parse_caption

    for pair in caption_pairs(30, seed=4, split="train"):
        other = moved_scene(pair.scene, random.Random(0))
        assert other != pair.scene and len(other) == len(pair.scene)
        key = lambda o: (o.shape, o.color, o.size)  # noqa: E731
        assert sorted(map(key, other)) == sorted(map(key, pair.scene))
    pictures, captions = caption_batch(8, seed=3, image_size=32, moved_fraction=0.5)
    assert pictures.shape == (8, 3, 32, 32) and len(captions) == 8
    for original, twin in zip(captions[:4], captions[4:]):  # the second half moves the first half's objects
        a, b = parse_caption(original), parse_caption(twin)
        assert a != b and sorted((o.shape, o.color, o.size) for o in a) == sorted((o.shape, o.color, o.size) for o in b)
    assert caption_batch(8, seed=3, image_size=32, moved_fraction=0.5)[1] == captions  # deterministic
    with pytest.raises(ValueError, match="moved_fraction"):
        caption_batch(8, seed=3, image_size=32, moved_fraction=0.9)


def test_shape_hard_negatives_change_one_shape_and_never_make_a_held_out_pair():
    import random

    from m2chat_lite.encoders import reshaped_scene
    from m2chat_lite.world import caption_pairs
    from m2chat_lite.world.scene import HELD_OUT

    rng = random.Random(0)
    for pair in caption_pairs(60, seed=5, split="train"):
        other = reshaped_scene(pair.scene, rng)
        changed = [(a, b) for a, b in zip(pair.scene, other) if a != b]
        assert len(changed) == 1 and len(other) == len(pair.scene)
        (a, b), = changed
        assert a.cell == b.cell and a.color == b.color and a.size == b.size and a.shape != b.shape
        assert not any((o.color, o.shape) in HELD_OUT for o in other)
    with pytest.raises(ValueError, match="add up to at most 0.5"):
        caption_batch(8, seed=3, image_size=32, moved_fraction=0.25, reshaped_fraction=0.5)
