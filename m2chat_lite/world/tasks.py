"""The four ShapeWorld tasks: caption pairs, stories, dialogues and visual questions.

Taught in notebook ``01_shapeworld``. They stand in for the paper's data: caption pairs for CC3M
(stage-1 alignment), stories for VIST, dialogues for MMDialog (stage-2 instruction), and visual
questions for the multimodal prompt fusion of notebook 05. Every generator is deterministic: the same
``(n, seed, split)`` always gives the same items. Items hold scenes, not pixels; ``render`` draws them and
``m2chat_lite.data`` turns them into the interleaved sample format.

``split="train"`` never uses a held-out colour–shape pair (``scene.HELD_OUT``); ``split="heldout"`` puts
one in every item, so a model's composition can be measured on pairs it never saw.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from .captions import (caption, cell_name, describe_object, join_phrases, noun_phrase, number_word,
                       position_phrase)
from .scene import (COLORS, GRID, HELD_OUT, SHAPES, Obj, Scene, allowed, check_split, random_object,
                    random_scene)

TASK_NAMES = ("caption", "story", "dialogue", "vqa")


@dataclass(frozen=True)
class CaptionPair:
    scene: Scene
    caption: str


@dataclass(frozen=True)
class StoryFrame:
    sentence: str
    scene: Scene


@dataclass(frozen=True)
class Story:
    prompt: str  # what the user asks for
    frames: tuple[StoryFrame, ...]
    character: Obj  # the main character as it first appears


@dataclass(frozen=True)
class DialogueTurn:
    """One turn. ``scene`` is the picture it carries (a user's upload or the assistant's drawing), if any.

    ``kind`` says what a user turn asks for (``request``, ``upload``, ``recolor``, ``move``, ``resize``,
    ``add``, ``question``) and is ``reply`` for the assistant; evaluation uses it to score edits.
    """

    role: str
    text: str
    scene: Scene | None = None
    kind: str = "reply"


@dataclass(frozen=True)
class Dialogue:
    turns: tuple[DialogueTurn, ...]


@dataclass(frozen=True)
class VisualQuestion:
    scene: Scene
    question: str
    answer: str
    kind: str  # one of VQA_KINDS


VQA_KINDS = ("color", "shape", "position", "count", "size", "exists")
EDIT_KINDS = ("recolor", "move", "resize", "add", "question")


def _rng(task: str, split: str, seed: int) -> random.Random:
    return random.Random(f"shapeworld:{task}:{split}:{seed}")  # str seeds are stable across runs


def _the(obj: Obj) -> str:
    return f"the {obj.color} {obj.shape}"


def _distinct_shape_scene(rng: random.Random, split: str, n: int) -> Scene:
    """A scene whose objects all have different shapes, so 'the circle' names exactly one object."""
    while True:
        scene = random_scene(rng, n, split)
        if len({o.shape for o in scene}) == len(scene):
            return scene


def _new_object(rng: random.Random, scene: Scene, split: str, avoid_shapes=()) -> Obj:
    cell = rng.choice(scene.free_cells())
    shapes = tuple(s for s in SHAPES if s not in avoid_shapes) or SHAPES
    return random_object(rng, cell, "any" if split == "heldout" else split, shapes=shapes)


# --- caption pairs ---------------------------------------------------------------------------------

def caption_pairs(n: int, seed: int = 0, split: str = "train", max_objects: int = 3) -> list[CaptionPair]:
    """``n`` scenes of 1..``max_objects`` objects, each with a caption in a random phrasing."""
    check_split(split)
    rng = _rng("caption", split, seed)
    pairs = []
    for _ in range(n):
        scene = random_scene(rng, rng.randint(1, max_objects), split)
        pairs.append(CaptionPair(scene, caption(scene, rng)))
    return pairs


# --- stories ---------------------------------------------------------------------------------------

STORY_PROMPTS = ("tell me a story about {np}.", "write a short story with pictures about {np}.",
                 "can you tell a picture story about {np}?")
STORY_OPENINGS = ("once upon a time there was {np} {where}.", "this is {np}. it lives {where}.",
                  "{np} sits {where}.")


def _story_event(rng: random.Random, hero: Obj, scene: Scene, split: str, has_friend: bool):
    """One thing that happens to the hero: returns (sentence, new hero, new scene)."""
    events = ["move", "resize", "recolor"] + ([] if has_friend else ["meet", "meet"])
    event = rng.choice(events)
    if event == "move":
        row, col = rng.choice(scene.free_cells())
        new = hero.moved(row, col)
        sentence = rng.choice((f"{_the(hero)} moves to the {cell_name(row, col)}.",
                               f"then {_the(hero)} goes to the {cell_name(row, col)}.",
                               f"now {_the(hero)} is {position_phrase(row, col, rng)}."))
    elif event == "resize":
        new = replace(hero, size="small" if hero.size == "large" else "large")
        verb = "grows big" if new.size == "large" else "shrinks and becomes small"
        sentence = f"{_the(hero)} {verb}."
    elif event == "recolor":
        colors = [c for c in COLORS if c != hero.color and allowed(replace(hero, color=c), split)]
        new = replace(hero, color=rng.choice(colors))
        sentence = rng.choice((f"the {hero.shape} turns {new.color}.",
                               f"suddenly {_the(hero)} becomes {new.color}."))
    else:  # meet a friend of another shape in a free cell
        friend = _new_object(rng, scene, split, avoid_shapes=(hero.shape,))
        sentence = rng.choice((f"{_the(hero)} meets {describe_object(friend, rng)}.",
                               f"a friend arrives: {describe_object(friend, rng)}."))
        return sentence, hero, scene.add(friend)
    return sentence, new, scene.replace_object(hero, new)


def stories(n: int, seed: int = 0, split: str = "train", min_frames: int = 3, max_frames: int = 5) -> list[Story]:
    """``n`` stories of ``min_frames``..``max_frames`` frames with one persistent hero.

    The hero moves, grows or shrinks, changes colour and meets a friend; each frame is a sentence and
    the scene after it. In the held-out split the hero is a held-out colour–shape pair.
    """
    check_split(split)
    if not 1 <= min_frames <= max_frames:
        raise ValueError(f"need 1 <= min_frames <= max_frames, got {min_frames} and {max_frames}")
    rng = _rng("story", split, seed)
    result = []
    for _ in range(n):
        cell = (rng.randrange(GRID), rng.randrange(GRID))
        if split == "heldout":
            color, shape = rng.choice(sorted(HELD_OUT))
            hero = Obj(cell[0], cell[1], shape, color, rng.choice(("small", "large")))
        else:
            hero = random_object(rng, cell, split)
        scene = Scene((hero,))
        prompt = rng.choice(STORY_PROMPTS).format(np=noun_phrase(hero, rng))
        opening = rng.choice(STORY_OPENINGS).format(np=noun_phrase(hero, rng),
                                                    where=position_phrase(hero.row, hero.col, rng))
        frames = [StoryFrame(opening, scene)]
        for _ in range(rng.randint(min_frames, max_frames) - 1):
            sentence, hero, scene = _story_event(rng, hero, scene, split, has_friend=len(scene) > 1)
            frames.append(StoryFrame(sentence, scene))
        result.append(Story(prompt, tuple(frames), frames[0].scene.objects[0]))
    return result


# --- dialogues -------------------------------------------------------------------------------------

REQUESTS = ("draw {d}.", "can you draw {d}?", "please make a picture of {d}.", "show me {d}.")
UPLOADS = ("here is my picture. what do you see?", "look at this picture. what is in it?")


def _ref(obj: Obj, scene: Scene) -> str:
    """How the user names the object: 'it' when it is alone, else 'the circle' (shapes are distinct)."""
    return "it" if len(scene) == 1 else f"the {obj.shape}"


def _follow_up(rng: random.Random, scene: Scene, split: str) -> tuple[DialogueTurn, DialogueTurn]:
    """A user turn that edits or asks about the current picture, and the assistant's answer."""
    kinds = ["recolor", "move", "resize", "question", "question"] + (["add"] if len(scene) < 3 else [])
    kind = rng.choice(kinds)
    target = rng.choice(scene.objects)
    ref = _ref(target, scene)
    if kind == "question":
        ask = rng.choice(("color", "where", "count"))
        if ask == "color":
            return (DialogueTurn("user", f"what colour is {ref}?", kind=kind),
                    DialogueTurn("assistant", f"it is {target.color}."))
        if ask == "where":
            return (DialogueTurn("user", f"where is {ref}?", kind=kind),
                    DialogueTurn("assistant", f"it is {position_phrase(target.row, target.col)}."))
        count = len(scene)
        answer = "there is one shape." if count == 1 else f"there are {number_word(count)} shapes."
        return DialogueTurn("user", "how many shapes are there?", kind=kind), DialogueTurn("assistant", answer)
    if kind == "add":
        new = _new_object(rng, scene, split, avoid_shapes=tuple(o.shape for o in scene))
        scene = scene.add(new)
        return (DialogueTurn("user", f"add {describe_object(new, rng)}.", kind=kind),
                DialogueTurn("assistant", f"i added {describe_object(new)}.", scene))
    if kind == "recolor":
        colors = [c for c in COLORS if c != target.color and allowed(replace(target, color=c), split)]
        new = replace(target, color=rng.choice(colors))
        request = rng.choice((f"make {ref} {new.color}.", f"change {ref} to {new.color}."))
        reply = f"done. the {new.shape} is now {new.color}."
    elif kind == "move":
        row, col = rng.choice(scene.free_cells())
        new = target.moved(row, col)
        request = f"move {ref} to the {cell_name(row, col)}."
        reply = f"sure. the {new.shape} is now {position_phrase(row, col)}."
    else:  # resize
        new = replace(target, size="small" if target.size == "large" else "large")
        request = f"make {ref} {'bigger' if new.size == 'large' else 'smaller'}."
        reply = f"ok. the {new.shape} is now {new.size}."
    return (DialogueTurn("user", request, kind=kind),
            DialogueTurn("assistant", reply, scene.replace_object(target, new)))


def dialogues(n: int, seed: int = 0, split: str = "train", min_follow_ups: int = 1,
              max_follow_ups: int = 3) -> list[Dialogue]:
    """``n`` multi-turn dialogues: a request for a picture (or an uploaded picture), then edits
    ("make it blue", "move the circle to the left", "add a small red square") and questions."""
    check_split(split)
    rng = _rng("dialogue", split, seed)
    result = []
    for _ in range(n):
        if rng.random() < 0.6:  # the user asks for a picture
            scene = _distinct_shape_scene(rng, split, rng.randint(1, 2))
            described = join_phrases([describe_object(o, rng) for o in scene])
            turns = [DialogueTurn("user", rng.choice(REQUESTS).format(d=described), kind="request"),
                     DialogueTurn("assistant", f"here is {caption(scene)}.", scene)]
        else:  # the user brings a picture
            scene = _distinct_shape_scene(rng, split, rng.randint(1, 3))
            turns = [DialogueTurn("user", rng.choice(UPLOADS), scene, kind="upload"),
                     DialogueTurn("assistant", f"i see {caption(scene)}.")]
        for _ in range(rng.randint(min_follow_ups, max_follow_ups)):
            user, reply = _follow_up(rng, scene, split)
            turns += [user, reply]
            scene = reply.scene or scene
        result.append(Dialogue(tuple(turns)))
    return result


# --- visual questions ------------------------------------------------------------------------------

def _question(rng: random.Random, scene: Scene, kind: str) -> tuple[str, str]:
    obj = rng.choice(scene.objects)
    if kind == "color":
        return f"what colour is the {obj.shape}?", obj.color
    if kind == "shape":
        return f"what shape is {position_phrase(obj.row, obj.col, rng)}?", obj.shape
    if kind == "position":
        return f"where is {_the(obj)}?", cell_name(obj.row, obj.col)
    if kind == "count":
        return rng.choice(("how many shapes are there?", "how many objects are in the picture?")), number_word(len(scene))
    if kind == "size":
        return f"is {_the(obj)} small or large?", obj.size
    # exists: half the time ask about something that is not there
    if rng.random() < 0.5:
        return f"is there a {obj.color} {obj.shape}?", "yes"
    present = {(o.color, o.shape) for o in scene}
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    color, shape = rng.choice(absent)
    return f"is there a {color} {shape}?", "no"


def visual_questions(n: int, seed: int = 0, split: str = "train", kinds=VQA_KINDS) -> list[VisualQuestion]:
    """``n`` questions about scenes (colour, shape, position, count, size, yes/no), one-word answers."""
    check_split(split)
    unknown = set(kinds) - set(VQA_KINDS)
    if unknown:
        raise ValueError(f"unknown question kinds {sorted(unknown)}; valid: {', '.join(VQA_KINDS)}")
    rng = _rng("vqa", split, seed)
    result = []
    for _ in range(n):
        scene = _distinct_shape_scene(rng, split, rng.randint(1, 3))
        kind = rng.choice(tuple(kinds))
        question, answer = _question(rng, scene, kind)
        result.append(VisualQuestion(scene, question, answer, kind))
    return result


# --- all of it as plain text -----------------------------------------------------------------------

def text_corpus(n_per_task: int = 1000, seed: int = 0, split: str = "train") -> list[str]:
    """Every sentence the four tasks produce (for training the tokenizer and the language model)."""
    texts = [p.caption for p in caption_pairs(n_per_task, seed, split)]
    for story in stories(n_per_task, seed, split):
        texts += [story.prompt] + [f.sentence for f in story.frames]
    for dialogue in dialogues(n_per_task, seed, split):
        texts += [t.text for t in dialogue.turns]
    for vq in visual_questions(n_per_task, seed, split):
        texts += [vq.question, vq.answer]
    return texts
