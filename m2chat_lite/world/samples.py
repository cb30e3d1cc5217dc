"""ShapeWorld items as interleaved samples: the bridge from ``world.tasks`` to ``m2chat_lite.data``.

Taught in notebook ``01_shapeworld``. Each task item becomes one :class:`~m2chat_lite.data.Sample`
whose pictures are rendered from its scenes and whose ``meta`` keeps the exact ground truth (scenes as
dicts), so any later evaluation can re-render at another size or score a generated picture with the oracle:

- caption: user ``caption`` → assistant picture (the same layout as ``data.read_caption_pairs``);
- story: user prompt → assistant ``sentence, picture, sentence, picture, ...``;
- dialogue: the turns as written; an uploaded picture comes before the user's words, a drawn one after
  the assistant's;
- vqa: user ``picture, question`` → assistant ``answer``.
"""

from __future__ import annotations

from ..data import Image, Sample, Text, Turn
from .scene import Scene, render
from .tasks import (TASK_NAMES, CaptionPair, Dialogue, Story, VisualQuestion, caption_pairs, dialogues,
                    stories, visual_questions)

_MAKERS = {"caption": caption_pairs, "story": stories, "dialogue": dialogues, "vqa": visual_questions}


def _picture(scene: Scene, image_size: int) -> Image:
    return Image(image=render(scene, image_size))


def to_sample(item, sample_id: str, image_size: int = 32, split: str = "train") -> Sample:
    """One ShapeWorld task item as an interleaved sample with its ground truth in ``meta``."""
    meta = {"split": split}
    if isinstance(item, CaptionPair):
        turns = [Turn("user", [Text(item.caption)]), Turn("assistant", [_picture(item.scene, image_size)])]
        return Sample(sample_id, "caption", turns, {**meta, "caption": item.caption, "scene": item.scene.to_dict()})
    if isinstance(item, Story):
        content = []
        for frame in item.frames:
            content += [Text(frame.sentence), _picture(frame.scene, image_size)]
        turns = [Turn("user", [Text(item.prompt)]), Turn("assistant", content)]
        return Sample(sample_id, "story", turns, {**meta, "character": item.character.to_dict(),
                                                  "scenes": [f.scene.to_dict() for f in item.frames]})
    if isinstance(item, Dialogue):
        turns = []
        for turn in item.turns:
            text = [Text(turn.text)]
            picture = [_picture(turn.scene, image_size)] if turn.scene is not None else []
            turns.append(Turn(turn.role, picture + text if turn.role == "user" else text + picture))
        meta["turns"] = [{"kind": t.kind, "scene": t.scene.to_dict() if t.scene else None} for t in item.turns]
        return Sample(sample_id, "dialogue", turns, meta)
    if isinstance(item, VisualQuestion):
        turns = [Turn("user", [_picture(item.scene, image_size), Text(item.question)]),
                 Turn("assistant", [Text(item.answer)])]
        return Sample(sample_id, "vqa", turns, {**meta, "kind": item.kind, "answer": item.answer,
                                                "scene": item.scene.to_dict()})
    raise TypeError(f"to_sample takes a CaptionPair, Story, Dialogue or VisualQuestion, got {type(item).__name__}")


def make_samples(task: str, n: int, seed: int = 0, split: str = "train", image_size: int = 32) -> list[Sample]:
    """``n`` samples of ``task`` (one of ``TASK_NAMES``), deterministic from ``seed`` and ``split``."""
    if task not in _MAKERS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASK_NAMES)}")
    items = _MAKERS[task](n, seed=seed, split=split)
    return [to_sample(item, f"{task}-{split}-{seed}-{i:05d}", image_size, split) for i, item in enumerate(items)]


def scenes_of(sample: Sample) -> list[Scene]:
    """The ground-truth scenes of a sample's pictures, in the order the pictures appear."""
    meta = sample.meta
    if sample.task in ("caption", "vqa"):
        return [Scene.from_dict(meta["scene"])]
    if sample.task == "story":
        return [Scene.from_dict(s) for s in meta["scenes"]]
    return [Scene.from_dict(t["scene"]) for t in meta["turns"] if t["scene"] is not None]
