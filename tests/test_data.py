"""Tests of m2chat_lite.data: the interleaved format, readers, writers, datasets and collators."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from m2chat_lite import data
from m2chat_lite.data import (
    CaptionCollator, ChatCollator, Image, Sample, SampleDataset, Text, Turn, image_to_tensor, load_image,
    read_caption_pairs, read_jsonl, read_mmdialog, read_vist, tensor_to_image, write_jsonl,
)

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"


def picture(seed=0, size=(16, 12)):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def story_sample(sid="s1", meta=None):
    return Sample(sid, "story", [
        Turn("system", [Text("You draw.")]),
        Turn("user", [Text("Tell me a story ✨"), Image(picture(1))]),
        Turn("assistant", [Text("Once."), Image(picture(2)), Text("Then."), Image(picture(3, (8, 8)))]),
    ], meta if meta is not None else {"scene": [{"shape": "circle", "xy": [1, 2]}], "note": "ü"})


def sha(p):
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def files(d):
    return sorted(str(p.relative_to(d)) for p in Path(d).rglob("*") if p.is_file())


# --- format in memory ------------------------------------------------------------------------------


def test_validation_and_helpers():
    with pytest.raises(ValueError, match="valid roles are system, user, assistant"):
        Turn("bot", [])
    with pytest.raises(ValueError, match="valid tasks are caption, story, dialogue, vqa"):
        Sample("x", "poem", [])
    with pytest.raises(ValueError, match="picture or a path"):
        Image()
    s = story_sample()
    assert len(s.images()) == 3
    assert s.text() == "You draw.\nTell me a story ✨\nOnce. Then."
    messages, images = s.to_messages()
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[2]["content"] == [{"type": "text", "text": "Once."}, {"type": "image"},
                                      {"type": "text", "text": "Then."}, {"type": "image"}]
    assert len(images) == 3 and all(isinstance(i, PIL.Image.Image) for i in images)


# --- write / read ----------------------------------------------------------------------------------


def test_round_trip(tmp_path):
    s = story_sample()
    out = write_jsonl([s, story_sample("s/2")], tmp_path / "d.jsonl")
    assert out == str(tmp_path / "d.jsonl")
    assert "images/s_2-0.png" in files(tmp_path)
    line = json.loads((tmp_path / "d.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert line["turns"][1]["content"][1] == {"type": "image", "image": "images/s1-0.png"}
    back = read_jsonl(tmp_path / "d.jsonl")
    assert [b.id for b in back] == ["s1", "s/2"]
    b = back[0]
    assert (b.task, b.meta) == (s.task, s.meta)
    assert [t.role for t in b.turns] == [t.role for t in s.turns]
    assert b.text() == s.text()
    for a, c in zip(s.images(), b.images()):
        assert c.image.mode == "RGB" and np.array_equal(np.asarray(a.image), np.asarray(c.image))
        assert os.path.isfile(c.path)
    lazy = read_jsonl(tmp_path / "d.jsonl", load_images=False)
    assert lazy[0].images()[0].image is None
    assert np.array_equal(np.asarray(lazy[0].images()[0].load()), np.asarray(s.images()[0].image))
    resized = read_jsonl(tmp_path / "d.jsonl", image_size=6)
    assert all(i.image.size == (6, 6) for i in resized[0].images())


def test_deterministic_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write_jsonl([story_sample()], a / "d.jsonl")
    write_jsonl([story_sample()], b / "d.jsonl")
    assert files(a) == files(b)
    assert all(sha(a / f) == sha(b / f) for f in files(a))
    first = sha(a / "d.jsonl")
    write_jsonl(read_jsonl(a / "d.jsonl"), a / "d.jsonl")  # re-writing what was read: same bytes
    assert sha(a / "d.jsonl") == first


def test_writer_leaves_nothing_on_bad_meta(tmp_path):
    target = tmp_path / "d.jsonl"
    target.write_text("old\n")
    with pytest.raises(ValueError, match="'s1': meta is not JSON-serialisable"):
        write_jsonl([story_sample(meta={"x": object()})], target)
    assert target.read_text() == "old\n"
    assert files(tmp_path) == ["d.jsonl"]  # no images, no temp files
    with pytest.raises(ValueError, match="share the id"):
        write_jsonl([story_sample(), story_sample()], target)


def test_writer_atomic_when_image_save_fails(tmp_path, monkeypatch):
    target = tmp_path / "d.jsonl"
    real_save = PIL.Image.Image.save
    calls = []

    def flaky_save(self, fp, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            fp.write(b"half a png")
            raise OSError("disk full")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image.Image, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        write_jsonl([story_sample()], target)
    assert not target.exists()
    assert files(tmp_path) == ["images/s1-0.png"]  # the complete first picture only; no temp file
    PIL.Image.open(tmp_path / "images/s1-0.png").load()


def test_writer_atomic_when_jsonl_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "d.jsonl"
    target.write_text("old\n")
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".jsonl"):
            raise OSError("no space")
        return real_replace(src, dst)

    monkeypatch.setattr(data.os, "replace", failing_replace)
    with pytest.raises(OSError, match="no space"):
        write_jsonl([story_sample()], target)
    assert target.read_text() == "old\n"
    assert not [f for f in files(tmp_path) if f.endswith(".tmp")]


@pytest.mark.parametrize("line, expected", [
    ("{not json", "line 2: invalid JSON"),
    ('["a list"]', "line 2: expected a JSON object with 'turns'"),
    ('{"id": "x", "turns": []}', "line 2: missing field 'task'"),
    ('{"id": "x", "task": "chat", "turns": []}', "line 2: unknown task 'chat'; valid tasks are"),
    ('{"id": "x", "task": "story", "turns": [{"role": "bot", "content": []}]}', "line 2: turn 0: unknown role"),
    ('{"id": "x", "task": "story", "turns": [{"role": "user", "content": [{"type": "video"}]}]}',
     "line 2: turn 0: content item"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, expected):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": "ok", "task": "vqa", "turns": []}\n' + line + "\n")
    with pytest.raises(ValueError) as e:
        read_jsonl(p)
    assert str(p) in str(e.value) and expected in str(e.value)


def test_missing_and_corrupt_image_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    item = {"id": "x", "task": "vqa", "turns": [{"role": "user", "content": [{"type": "image", "image": "gone.png"}]}]}
    p.write_text("\n" + json.dumps(item) + "\n")
    with pytest.raises(FileNotFoundError) as e:
        read_jsonl(p)
    assert f"{p} line 2" in str(e.value) and str(tmp_path / "gone.png") in str(e.value)
    assert read_jsonl(p, load_images=False)[0].images()[0].path == str(tmp_path / "gone.png")
    (tmp_path / "gone.png").write_bytes(b"")
    with pytest.raises(ValueError, match="line 2.*cannot read image .*gone.png"):
        read_jsonl(p)
    good = tmp_path / "good.png"
    picture(size=(40, 40)).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:60])
    with pytest.raises(ValueError, match="cannot read image .*cut.png"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(ValueError, match="zero size"):
        load_image(PIL.Image.new("RGB", (0, 5)))


def test_empty_file(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text("\n\n")
    with pytest.raises(ValueError, match="contains no samples.*allow_empty=True"):
        read_jsonl(p)
    assert read_jsonl(p, allow_empty=True) == []
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl")


# --- images ----------------------------------------------------------------------------------------


def test_image_modes_convert_to_rgb(tmp_path):
    rgba = PIL.Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(PIL.Image.new("RGBA", (4, 4), (255, 0, 0, 255))).getpixel((0, 0)) == (255, 0, 0)
    assert load_image(PIL.Image.new("L", (4, 4), 100)).getpixel((0, 0)) == (100, 100, 100)
    pal = PIL.Image.new("RGB", (4, 4), (0, 0, 200)).convert("P", palette=PIL.Image.Palette.ADAPTIVE)
    assert load_image(pal).getpixel((0, 0)) == (0, 0, 200)
    i16 = PIL.Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert i16.mode.startswith("I;16") and load_image(i16).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(PIL.Image.new("CMYK", (4, 4), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    for im in (rgba, pal, i16, PIL.Image.new("CMYK", (3, 5)), PIL.Image.new("1", (3, 3)), PIL.Image.new("LA", (2, 2))):
        assert load_image(im).mode == "RGB"
    # from files too: a 16-bit PNG and a palette PNG with transparency
    i16.save(tmp_path / "i16.png")
    assert load_image(tmp_path / "i16.png").getpixel((1, 1)) == (255, 255, 255)
    pt = PIL.Image.new("P", (4, 4), 0)
    pt.putpalette([0, 0, 0] * 256)
    pt.info["transparency"] = 0
    pt.save(tmp_path / "pt.png")
    assert load_image(tmp_path / "pt.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_image(tmp_path / "pt.png", mode="L").mode == "L"


def test_resize_center_crop():
    im = PIL.Image.new("RGB", (30, 10), (255, 0, 0))
    im.paste((0, 0, 255), (10, 0, 20, 10))  # blue middle third
    out = load_image(im, size=7)
    assert out.size == (7, 7) and out.getpixel((3, 3)) == (0, 0, 255)
    assert load_image(picture(size=(13, 31)), size=5).size == (5, 5)
    with pytest.raises(ValueError, match="positive int"):
        load_image(im, size=0)


def test_tensor_round_trip():
    im = picture(size=(9, 5))
    t = image_to_tensor(im)
    assert t.shape == (3, 5, 9) and t.dtype == torch.float32 and t.min() >= -1 and t.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_image(t)), np.asarray(im))
    assert tensor_to_image(torch.full((3, 2, 2), 5.0)).getpixel((0, 0)) == (255, 255, 255)
    assert image_to_tensor(PIL.Image.new("L", (2, 2))).shape == (3, 2, 2)


# --- real-data readers -----------------------------------------------------------------------------


def test_vist_sample_file():
    stories = read_vist(SAMPLES / "vist/sis_sample.json", SAMPLES / "vist/images")
    assert [s.id for s in stories] == ["vist-45530", "vist-45531"]
    for s in stories:
        assert s.task == "story" and [t.role for t in s.turns] == ["user", "assistant"]
        assert s.turns[0].content == [Text(data.STORY_PROMPT)]
        kinds = [type(c).__name__ for c in s.turns[1].content]
        assert kinds == ["Text", "Image"] * 4
        assert all(i.image.size == (64, 64) for i in s.images())
    assert stories[0].turns[1].content[0].text.startswith("a little red circle")  # order 0 first
    orig = read_vist(SAMPLES / "vist/sis_sample.json", SAMPLES / "vist/images", text_field="original_text",
                     load_images=False)
    assert orig[0].turns[1].content[0].text.startswith("A little red circle")


def test_vist_missing_image_and_jpg(tmp_path):
    sis = {"annotations": [[{"story_id": "1", "photo_flickr_id": "p1", "worker_arranged_photo_order": 0,
                             "text": "a"}]],
           "images": []}
    sis["annotations"].append([dict(sis["annotations"][0][0], story_id="2", photo_flickr_id="p2")])
    (tmp_path / "sis.json").write_text(json.dumps(sis))
    picture().save(tmp_path / "p1.jpg")
    with pytest.raises(FileNotFoundError, match="story 2: image .*p2.jpg not found"):
        read_vist(tmp_path / "sis.json", tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        stories = read_vist(tmp_path / "sis.json", tmp_path, skip_missing=True)
    assert [s.id for s in stories] == ["vist-1"]
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="'annotations'"):
        read_vist(tmp_path / "bad.json", tmp_path)


def test_mmdialog_sample_file():
    dialogues = read_mmdialog(SAMPLES / "mmdialog/sample.jsonl", SAMPLES / "mmdialog/images")
    assert [d.id for d in dialogues] == ["mmdialog-c1", "mmdialog-c2"]
    for d in dialogues:
        assert d.task == "dialogue" and [t.role for t in d.turns] == ["user", "assistant"] * 2
        assert len(d.images()) == 2
    assert isinstance(dialogues[1].turns[0].content[1], Image)  # user image after the user text
    assert dialogues[1].turns[3].content == [dialogues[1].images()[1]]  # image-only reply


def test_mmdialog_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"conversation_id": "a", "conversation": [{"turn_id": 0, "text": "hi"}]}\n'
                 '{"conversation_id": "z", "conversation": []}\n')
    with pytest.raises(ValueError, match=r"d.jsonl line 2: conversation z is empty"):
        read_mmdialog(p)
    p.write_text('{"conversation": [{"turn_id": 1, "text": "b"}, {"turn_id": 0, "text": "a"},'
                 ' {"turn_id": 2, "speaker": 1, "text": "c", "images": ["x.png"]}]}\n')
    with pytest.raises(FileNotFoundError, match="line 1: image .*x.png not found"):
        read_mmdialog(p)
    picture().save(tmp_path / "x.png")
    (d,) = read_mmdialog(p)
    assert [t.role for t in d.turns] == ["user", "assistant"]  # a, b alternate; b and c merge
    assert d.text() == "a\nb c" and len(d.images()) == 1


def test_caption_pairs(tmp_path):
    caps = read_caption_pairs(SAMPLES / "captions")
    assert len(caps) == 4 and all(c.task == "caption" for c in caps)
    c = caps[0]
    assert [t.role for t in c.turns] == ["user", "assistant"] and c.meta["caption"] == c.text()
    assert isinstance(c.turns[1].content[0], Image)
    picture().save(tmp_path / "a.png")
    (tmp_path / "l.jsonl").write_text(json.dumps({"image": "a.png", "caption": "noise"}) + "\n")
    (j,) = read_caption_pairs(tmp_path / "l.jsonl", prompt="Draw: {caption}")
    assert j.text() == "Draw: noise" and j.meta["caption"] == "noise"
    with pytest.raises(FileNotFoundError, match="no caption file a.txt"):
        read_caption_pairs(tmp_path)


def test_write_real_data_to_interleaved_format(tmp_path):
    stories = read_vist(SAMPLES / "vist/sis_sample.json", SAMPLES / "vist/images", load_images=False)
    write_jsonl(stories, tmp_path / "stories.jsonl")  # pictures loaded from their paths
    back = read_jsonl(tmp_path / "stories.jsonl")
    assert len(back) == 2 and len(back[1].images()) == 4 and back[1].meta["story_id"] == "45531"


def test_sample_files_are_small():
    assert sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file()) < 200_000


# --- torch -----------------------------------------------------------------------------------------


def test_sample_dataset(tmp_path):
    write_jsonl([story_sample("a"), story_sample("b")], tmp_path / "d.jsonl")
    ds = SampleDataset(tmp_path / "d.jsonl", transform=lambda s: s.id)
    assert len(ds) == 2 and ds[1] == "b"
    assert SampleDataset([story_sample()])[0].id == "s1"


@pytest.fixture(scope="module")
def tok():
    tokenizer = pytest.importorskip("m2chat_lite.tokenizer")
    texts = [s.text() for s in read_caption_pairs(SAMPLES / "captions", load_images=False)] * 5
    return tokenizer.train_tokenizer(texts, vocab_size=300, num_image_tokens=2)


def test_caption_collator(tok):
    caps = read_caption_pairs(SAMPLES / "captions")
    batch = CaptionCollator(tok, image_size=32, max_length=6)(caps[:3])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 3 and ids.shape[1] <= 6
    assert batch["captions"] == [c.meta["caption"] for c in caps[:3]]
    lengths = mask.sum(1)
    for row, n in zip(ids, lengths):
        assert (row[n:] == tok.pad_token_id).all() and mask[0, :n].all()  # right padding
    short = Sample("s", "caption", [Turn("user", [Text("a")]), Turn("assistant", [Image(picture())])],
                   {"caption": "a"})
    b2 = CaptionCollator(tok, 8, 6)([short, caps[0]])
    assert b2["attention_mask"][0].tolist()[:2] == [1, 0] and b2["input_ids"][0, 1] == tok.pad_token_id
    assert CaptionCollator(tok, 8, 6, padding="max_length")([short])["input_ids"].shape == (1, 6)
    with pytest.raises(ValueError, match="caption samples only"):
        CaptionCollator(tok, 8, 6)([story_sample()])


def test_chat_collator(tok):
    from m2chat_lite.tokenizer import encode_chat

    dialogues = read_mmdialog(SAMPLES / "mmdialog/sample.jsonl", SAMPLES / "mmdialog/images")
    text_only = Sample("t", "dialogue", [Turn("user", [Text("hi")]), Turn("assistant", [Text("hello")])])
    batch = [dialogues[0], text_only, dialogues[1]]
    out = ChatCollator(tok, image_size=16)(batch)
    B, T = out["input_ids"].shape
    assert B == 3 and out["attention_mask"].shape == out["labels"].shape == (B, T)
    assert out["pixel_values"].shape == (4, 3, 16, 16)
    assert out["image_batch_index"].tolist() == [0, 0, 2, 2]
    assert [len(p) for p in out["image_positions"]] == [2, 0, 2]
    for b, s in enumerate(batch):
        enc = encode_chat(tok, s.to_messages()[0])
        n = len(enc["input_ids"])
        assert out["input_ids"][b, :n].tolist() == enc["input_ids"]
        assert out["labels"][b, :n].tolist() == enc["labels"]
        assert (out["labels"][b, n:] == -100).all() and (out["input_ids"][b, n:] == tok.pad_token_id).all()
        assert out["attention_mask"][b].sum() == n
        assert out["image_positions"][b] == enc["image_positions"]
    empty = ChatCollator(tok, image_size=16)([text_only])
    assert empty["pixel_values"].shape == (0, 3, 16, 16) and empty["image_batch_index"].shape == (0,)
