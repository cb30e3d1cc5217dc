"""metrics.py on cases whose answers are known."""

import math

import numpy as np
import pytest
import torch

from m2chat_lite import metrics
from m2chat_lite.benchmark import load_benchmark
from m2chat_lite.world import Obj, Scene, render
from m2chat_lite.world.samples import scenes_of

RED_CIRCLE = Obj(0, 0, "circle", "red", "large")
BLUE_SQUARE = Obj(2, 2, "square", "blue", "small")


def test_frechet_distance_of_known_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 3))
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert metrics.frechet_distance(a, a + 2.0) == pytest.approx(3 * 4.0, rel=1e-6)  # |Δμ|² = 3·2², same spread
    x, y = rng.normal(size=(400, 1)), 3 * rng.normal(size=(400, 1))
    expected = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2  # 1-D: (μ₁−μ₂)² + (σ₁−σ₂)²
    assert metrics.frechet_distance(torch.tensor(x), torch.tensor(y)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="same d"):
        metrics.frechet_distance(a, a[:, :2])


def test_fid_on_the_tiny_clip_is_zero_for_the_same_pictures_and_grows_with_a_shift():
    from m2chat_lite.encoders import load_clip
    from m2chat_lite.foundation import REFERENCE_DIR

    clip, _ = load_clip(REFERENCE_DIR / "clip")
    real = [s.images()[0].load() for s in load_benchmark("caption", split="test")[:40]]
    other = [s.images()[0].load() for s in load_benchmark("caption", split="test")[40:80]]
    blank = [render(Scene(())) for _ in range(40)]
    same = metrics.fid(clip, real, real)
    assert same == pytest.approx(0.0, abs=1e-3)
    assert metrics.fid(clip, real, other) < metrics.fid(clip, real, blank)


def test_inception_fid_is_skipped_with_a_reason_when_it_cannot_run(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    value, why = metrics.inception_fid([render(Scene((RED_CIRCLE,)))] * 2, [render(Scene((RED_CIRCLE,)))] * 2)
    assert value is None and why.startswith("skipped")


def test_scene_scores_read_rendered_scenes_exactly():
    scenes = [Scene((RED_CIRCLE,)), Scene((RED_CIRCLE, BLUE_SQUARE))]
    right = metrics.scene_scores([render(s) for s in scenes], scenes)
    assert right["exact"] == 1.0 and right["n"] == 2
    wrong = metrics.scene_scores([render(Scene(()))] * 2, scenes)
    assert wrong["exact"] == 0.0 and wrong["position"] == 0.0
    with pytest.raises(ValueError, match="one scene per picture"):
        metrics.scene_scores([], scenes)


def test_story_scores_on_the_ground_truth_and_on_a_character_that_changes():
    story = load_benchmark("story", split="test")[0]
    scenes = scenes_of(story)
    character = Obj(**story.meta["character"])
    truth = metrics.story_scores([render(s) for s in scenes], scenes, character)
    assert truth["alignment"]["exact"] == 1.0 and truth["consistency"] == 1.0 and truth["frames"] == len(scenes)
    other_colour = "green" if character.color != "green" else "red"
    changed = [Scene(tuple(Obj(o.row, o.col, o.shape, other_colour, o.size) for o in s)) for s in scenes]
    frames = [render(scenes[0])] + [render(s) for s in changed[1:]]
    broken = metrics.story_scores(frames, scenes, character)
    assert broken["consistency"] == 0.0 and broken["alignment"]["position"] == 1.0


def test_edit_scores_tell_success_from_preservation():
    before = Scene((RED_CIRCLE, BLUE_SQUARE))
    after = Scene((Obj(0, 0, "circle", "red", "small"), BLUE_SQUARE))  # "make the circle smaller"
    done = metrics.edit_scores(render(after), before, after)
    assert done == {"success": 1.0, "preservation": 1.0, "exact": 1.0}
    ignored = metrics.edit_scores(render(before), before, after)
    assert ignored["success"] == 0.0 and ignored["preservation"] == 1.0 and ignored["exact"] == 0.0
    only = metrics.edit_scores(render(after), Scene((RED_CIRCLE,)), Scene((Obj(1, 1, "circle", "red", "large"),)))
    assert only["preservation"] is None and only["success"] == 0.0


def test_exact_match_and_bleu_on_known_texts():
    assert metrics.exact_match(["Red.", "two"], ["red", "three"]) == 0.5
    assert metrics.bleu(["the red square grows."], ["the red square grows"]) == pytest.approx(1.0)
    assert metrics.bleu(["a b c d"], ["e f g h"]) == 0.0
    # unigrams 5/6, bigrams 3/5, trigrams 2/4, 4-grams 1/3, same length
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected)
    short = metrics.bleu(["the cat sat on"], ["the cat sat on a mat"])
    assert short == pytest.approx(math.exp(1 - 6 / 4))  # all n-grams match: only the brevity penalty
    with pytest.raises(ValueError):
        metrics.bleu([], [])
