"""ShapeWorld: scenes, rendering, captions, the four tasks and the oracle."""

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from m2chat_lite.world import (COLORS, HELD_OUT, SHAPES, Obj, Scene, caption, caption_pairs, dialogues,
                               parse_caption, random_scene, read_scene, read_story, render, score, stories,
                               text_corpus, visual_questions)
from m2chat_lite.world.oracle import read_blobs
from m2chat_lite.world.scene import BACKGROUND


def test_scene_validates_and_sorts():
    a, b = Obj(2, 2, "circle", "red", "small"), Obj(0, 0, "square", "blue", "large")
    assert Scene((a, b)).objects == (b, a)
    with pytest.raises(ValueError, match="share a cell"):
        Scene((a, Obj(2, 2, "square", "red", "small")))
    with pytest.raises(ValueError, match="unknown colour 'pink'; valid: red"):
        Obj(0, 0, "circle", "pink", "small")
    with pytest.raises(ValueError, match="at most 3"):
        Scene(tuple(Obj(0, c, "circle", "red", "small") for c in range(3)) + (Obj(1, 0, "circle", "red", "small"),))
    assert Scene.from_dict(Scene((a, b)).to_dict()) == Scene((a, b))


def test_random_scene_is_deterministic_and_respects_splits():
    assert [random_scene(random.Random(7)) for _ in range(3)] == [random_scene(random.Random(7)) for _ in range(3)]
    rng = random.Random(0)
    train = [random_scene(rng, split="train") for _ in range(500)]
    held = [random_scene(rng, split="heldout") for _ in range(500)]
    assert not any(s.held_out for s in train)
    assert all(s.held_out for s in held)
    with pytest.raises(ValueError, match="unknown split 'test'; valid: train, heldout, any"):
        random_scene(rng, split="test")


@pytest.mark.parametrize("size", [32, 64])
def test_render_is_deterministic_with_plain_background(size):
    scene = Scene((Obj(1, 1, "triangle", "purple", "large"),))
    a, b = np.asarray(render(scene, size)), np.asarray(render(scene, size))
    assert a.shape == (size, size, 3) and (a == b).all()
    assert tuple(a[0, 0]) == BACKGROUND and tuple(a[size // 2, size // 2]) == COLORS["purple"]


def test_captions_read_back_to_their_scene():
    rng = random.Random(0)
    for pair in caption_pairs(300, seed=1):
        assert parse_caption(pair.caption) == pair.scene, pair.caption
    scene = random_scene(rng, 3)
    assert caption(scene) == caption(scene)  # canonical phrasing
    assert len({caption(scene, random.Random(i)) for i in range(20)}) > 3  # several phrasings per fact
    assert parse_caption("a dog on a sofa") is None


@pytest.mark.parametrize("size", [32, 64])
def test_oracle_reads_rendered_scenes(size):
    """The oracle must be right on >= 99.5% of rendered scenes (1, 2 and 3 objects)."""
    rng = random.Random(size)
    scenes = [random_scene(rng, n_objects=1 + i % 3, split="any") for i in range(1200)]
    correct = sum(read_scene(render(s, size)) == s for s in scenes)
    accuracy = correct / len(scenes)
    print(f"oracle accuracy at {size}x{size}: {accuracy:.4f} on {len(scenes)} scenes")
    assert accuracy >= 0.995


def test_oracle_tolerates_noise_and_blur():
    """Generated pictures are blurry and noisy; the oracle should still read them."""
    rng, noise = random.Random(3), np.random.default_rng(0)
    scenes = [random_scene(rng, split="any") for _ in range(300)]
    correct = 0
    for scene in scenes:
        pixels = np.asarray(render(scene, 32), np.float32) + noise.normal(0, 12, (32, 32, 3))
        noisy = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
        correct += read_scene(noisy) == scene
    assert correct / len(scenes) >= 0.97


def test_oracle_tolerates_an_off_centre_shape():
    scene = Scene((Obj(1, 1, "triangle", "red", "large"),))
    shifted = Image.fromarray(np.roll(np.asarray(render(scene, 64)), (2, -2), axis=(0, 1)))
    assert read_scene(shifted) == scene


def test_oracle_ignores_specks_and_scores_attributes():
    target = Scene((Obj(0, 0, "circle", "red", "large"), Obj(2, 2, "square", "blue", "small")))
    pixels = np.asarray(render(target, 32)).copy()
    pixels[15, 15] = COLORS["green"]  # one stray pixel is not an object
    assert read_scene(pixels) == target
    assert score(render(target, 32), target) == {"position": 1.0, "shape": 1.0, "color": 1.0, "size": 1.0,
                                                 "count": 1.0, "exact": 1.0}
    wrong = Scene((Obj(0, 0, "circle", "yellow", "large"),))  # right place and shape, wrong colour, one missing
    s = score(render(wrong, 32), target)
    assert s["position"] == 0.5 and s["shape"] == 0.5 and s["color"] == 0.0 and s["count"] == 0.0 and s["exact"] == 0.0
    assert read_blobs(Image.new("RGB", (32, 32), BACKGROUND)) == []


def test_oracle_rejects_non_square_input():
    with pytest.raises(ValueError, match="square"):
        read_scene(np.zeros((32, 48, 3)))


def test_tasks_are_deterministic():
    for make in (caption_pairs, stories, dialogues, visual_questions):
        assert make(20, seed=5) == make(20, seed=5)
        assert make(20, seed=5) != make(20, seed=6)


def test_train_split_never_shows_held_out_pairs():
    def objects(item):
        if hasattr(item, "frames"):
            return [o for f in item.frames for o in f.scene]
        if hasattr(item, "turns"):
            return [o for t in item.turns if t.scene for o in t.scene]
        return list(item.scene)
    for make in (caption_pairs, stories, dialogues, visual_questions):
        train = [o for item in make(200, seed=0, split="train") for o in objects(item)]
        assert not any((o.color, o.shape) in HELD_OUT for o in train), make.__name__
        held = make(50, seed=0, split="heldout")
        assert all(any((o.color, o.shape) in HELD_OUT for o in objects(item)) for item in held), make.__name__


def test_stories_keep_a_persistent_hero():
    for story in stories(100, seed=0):
        assert 3 <= len(story.frames) <= 5
        hero = story.character
        for prev, frame in zip(story.frames, story.frames[1:]):
            # each step changes one object (the hero) or adds one friend
            before, after = set(prev.scene), set(frame.scene)
            assert (len(before - after), len(after - before)) in ((1, 1), (0, 1))
            assert frame.sentence.endswith(".")
        assert hero in story.frames[0].scene


def test_dialogue_edits_change_only_what_was_asked():
    for dialogue in dialogues(200, seed=1):
        turns = dialogue.turns
        assert [t.role for t in turns] == ["user", "assistant"] * (len(turns) // 2)
        current = turns[0].scene or turns[1].scene
        for user, reply in zip(turns[2::2], turns[3::2]):
            if user.kind == "question":
                assert reply.scene is None
                continue
            before, after = set(current), set(reply.scene)
            if user.kind == "add":
                assert before < after and len(after - before) == 1
            else:  # recolor, move, resize: exactly one object changes, everything else is preserved
                assert len(before - after) == 1 and len(after - before) == 1
                (old,), (new,) = before - after, after - before
                changed = [a for a in ("row", "col", "shape", "color", "size") if getattr(old, a) != getattr(new, a)]
                expected = {"recolor": ["color"], "resize": ["size"]}.get(user.kind)
                assert changed == expected if expected else set(changed) <= {"row", "col"}
            current = reply.scene


def test_a_story_reads_back_to_its_scenes_until_it_stops_making_sense():
    for split in ("train", "heldout"):
        for story in stories(200, seed=3, split=split):
            assert read_story([f.sentence for f in story.frames]) == [f.scene for f in story.frames]
    hero = Obj(0, 0, "circle", "red", "large")
    told = read_story(["this is a big red circle. it lives at the top left.", "the red circle moves to the center.",
                       "a friend arrives: a small blue square at the top left.", "the circle turns green.",
                       "the green circle shrinks and becomes small."])
    friend = Obj(0, 0, "square", "blue", "small")
    assert told == [Scene((hero,)), Scene((hero.moved(1, 1),)), Scene((hero.moved(1, 1), friend)),
                    Scene((Obj(1, 1, "circle", "green", "large"), friend)),
                    Scene((Obj(1, 1, "circle", "green", "small"), friend))]
    # a sentence about another shape, or a move onto the friend: unread from there on
    assert read_story(["a big red circle sits at the top left.", "the square grows big.", "the circle turns blue."]) \
        == [Scene((hero,)), None, None]
    blocked = ["a big red circle sits in the center.", "the red circle meets a small blue square at the top left.",
               "the red circle moves to the top left."]
    assert read_story(blocked)[2] is None
    assert read_story(["once upon a time.", "the circle grows big."]) == [None, None]


def test_visual_questions_have_correct_answers():
    for vq in visual_questions(300, seed=2):
        scene = vq.scene
        if vq.kind == "color":
            shape = vq.question.split("the ")[1].rstrip("?")
            assert [o.color for o in scene if o.shape == shape] == [vq.answer]
        elif vq.kind == "count":
            assert vq.answer == ["zero", "one", "two", "three"][len(scene)]
        elif vq.kind == "exists":
            color, shape = vq.question.rstrip("?").split()[-2:]
            assert vq.answer == ("yes" if any((o.color, o.shape) == (color, shape) for o in scene) else "no")
        elif vq.kind == "shape":
            assert vq.answer in SHAPES


def test_text_corpus_covers_every_task():
    corpus = text_corpus(50, seed=0)
    joined = " ".join(corpus)
    for phrase in ("story", "draw", "what colour", "how many", "make", "turns"):
        assert phrase in joined, phrase
    assert len(corpus) > 200
