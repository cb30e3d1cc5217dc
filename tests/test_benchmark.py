"""The frozen benchmark split: the shipped files match their manifest and what the command writes."""

import json
import random

import numpy as np
import pytest

from m2chat_lite import benchmark
from m2chat_lite.benchmark import (BENCHMARK_COUNTS, load_benchmark, verify_benchmark, write_benchmark)
from m2chat_lite.cli import main
from m2chat_lite.data import Text
from m2chat_lite.world import HELD_OUT, read_scene
from m2chat_lite.world.samples import make_samples, scenes_of, to_sample


def test_shipped_benchmark_matches_its_manifest():
    manifest = verify_benchmark()
    assert manifest["command"] == "m2chat-lite data --benchmark"
    for task, (n_test, n_heldout) in BENCHMARK_COUNTS.items():
        samples = load_benchmark(task, verify=False, load_images=False)
        assert [s.meta["split"] for s in samples].count("test") == n_test
        assert [s.meta["split"] for s in samples].count("heldout") == n_heldout


def test_shipped_benchmark_pictures_show_their_ground_truth():
    """Every picture of a sample of each task reads back, through the oracle, as its stored scene."""
    for task in BENCHMARK_COUNTS:
        for sample in random.Random(task).sample(load_benchmark(task, verify=False), 10):
            pictures = [seg.load() for seg in sample.images()]
            assert [read_scene(p) for p in pictures] == scenes_of(sample), sample.id


def test_held_out_part_has_held_out_pairs_and_test_part_has_none():
    for sample in load_benchmark("caption", split="heldout", verify=False, load_images=False):
        assert any((o.color, o.shape) in HELD_OUT for o in scenes_of(sample)[0])
    for sample in load_benchmark("caption", split="test", verify=False, load_images=False):
        assert not any((o.color, o.shape) in HELD_OUT for o in scenes_of(sample)[0])


@pytest.fixture
def small_counts(monkeypatch):
    monkeypatch.setattr(benchmark, "BENCHMARK_COUNTS", {t: (4, 2) for t in BENCHMARK_COUNTS})


def test_command_writes_a_verifiable_split_once(tmp_path, small_counts, capsys):
    out = tmp_path / "bench"
    assert main(["data", "--benchmark", "--out", str(out)]) == 0
    assert "wrote the ShapeWorld benchmark split" in capsys.readouterr().out
    assert main(["data", "--verify", "--out", str(out)]) == 0
    assert main(["data", "--benchmark", "--out", str(out)]) == 1  # written once
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "--benchmark", "--force", "--out", str(out)]) == 0


def test_the_shipped_split_is_what_the_generator_makes():
    """Regenerating gives the same samples (compared decoded, so a new PNG encoder cannot break it)."""
    shipped = load_benchmark("vqa", verify=False)
    regenerated = benchmark.benchmark_samples("vqa")
    assert [s.id for s in shipped] == [s.id for s in regenerated]
    for a, b in list(zip(shipped, regenerated))[::37]:
        assert a.meta == b.meta and a.text() == b.text()
        assert all(np.array_equal(np.asarray(x.load()), np.asarray(y.load()))
                   for x, y in zip(a.images(), b.images()))


def test_verify_names_a_changed_or_missing_file(tmp_path, small_counts):
    out = write_benchmark(tmp_path / "bench")
    (out / "caption.jsonl").write_text("tampered\n")
    (out / "images" / "vqa").rename(out / "gone")
    with pytest.raises(ValueError, match=r"changed caption.jsonl.*missing images/vqa"):
        verify_benchmark(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid benchmark manifest"):
        verify_benchmark(out)
    with pytest.raises(FileNotFoundError, match="m2chat-lite data --benchmark"):
        verify_benchmark(tmp_path / "nowhere")


def test_a_failed_write_leaves_nothing_behind(tmp_path, small_counts, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(benchmark, "write_jsonl", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_benchmark(tmp_path / "bench")
    assert list(tmp_path.iterdir()) == []


def test_samples_carry_the_task_layout():
    caption, = make_samples("caption", 1, seed=3)
    assert [t.role for t in caption.turns] == ["user", "assistant"]
    assert caption.meta["caption"] == caption.turns[0].content[0].text
    story, = make_samples("story", 1, seed=3)
    kinds = [type(seg).__name__ for seg in story.turns[1].content]
    assert kinds == ["Text", "Image"] * (len(kinds) // 2) and len(scenes_of(story)) == len(kinds) // 2
    vqa, = make_samples("vqa", 1, seed=3)
    assert [type(seg).__name__ for seg in vqa.turns[0].content] == ["Image", "Text"]
    assert vqa.turns[1].content == [Text(vqa.meta["answer"])]
    dialogue, = make_samples("dialogue", 1, seed=3)
    assert len(scenes_of(dialogue)) == len(dialogue.images())
    json.dumps([s.meta for s in (caption, story, vqa, dialogue)])  # meta is plain JSON
    with pytest.raises(ValueError, match="unknown task 'poem'; valid: caption, story, dialogue, vqa"):
        make_samples("poem", 1)
    with pytest.raises(TypeError, match="CaptionPair, Story"):
        to_sample("not an item", "x")
