"""Words for ShapeWorld: a small grammar that describes objects and scenes, and reads captions back.

Taught in notebook ``01_shapeworld``. Every fact has several phrasings ("a big red circle at the top
left", "there is a large red circle in the top left corner") so the models learn meanings, not strings;
``rng=None`` always picks the first phrasing, which gives one canonical caption per scene.
``parse_caption`` inverts the grammar, so any caption the package writes can be turned back into a scene.
"""

from __future__ import annotations

import random
import re

from .scene import COLORS, SHAPES, Obj, Scene

SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Phrases for each cell, canonical first. A cell's name ("top left", "center") is its first phrase
# without the preposition; it is also the answer to "where is ...?".
POSITION_PHRASES = {
    (0, 0): ("at the top left", "in the top left corner"),
    (0, 1): ("at the top", "at the top center"),
    (0, 2): ("at the top right", "in the top right corner"),
    (1, 0): ("on the left", "at the middle left"),
    (1, 1): ("in the center", "in the middle"),
    (1, 2): ("on the right", "at the middle right"),
    (2, 0): ("at the bottom left", "in the bottom left corner"),
    (2, 1): ("at the bottom", "at the bottom center"),
    (2, 2): ("at the bottom right", "in the bottom right corner"),
}
CELL_NAMES = {cell: phrases[0].split(" ", 2)[-1] for cell, phrases in POSITION_PHRASES.items()}

SCENE_TEMPLATES = ("{objects}", "there is {objects}", "a picture of {objects}", "{objects} on a plain background")


def _pick(options, rng: random.Random | None):
    return options[0] if rng is None else rng.choice(options)


def cell_name(row: int, col: int) -> str:
    """'top left', 'center', 'bottom', ... (the answer to a "where" question)."""
    return CELL_NAMES[(row, col)]


def position_phrase(row: int, col: int, rng: random.Random | None = None) -> str:
    return _pick(POSITION_PHRASES[(row, col)], rng)


def noun_phrase(obj: Obj, rng: random.Random | None = None, article: str = "a") -> str:
    """'a big red circle' (size, colour, shape), without the position."""
    return f"{article} {_pick(SIZE_WORDS[obj.size], rng)} {obj.color} {obj.shape}"


def describe_object(obj: Obj, rng: random.Random | None = None) -> str:
    """'a big red circle at the top left'."""
    return f"{noun_phrase(obj, rng)} {position_phrase(obj.row, obj.col, rng)}"


def join_phrases(phrases: list[str]) -> str:
    if len(phrases) <= 2:
        return " and ".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """A caption for ``scene``; ``rng=None`` gives the canonical one."""
    if not len(scene):
        return "an empty picture"
    objects = list(scene)
    if rng is not None:
        rng.shuffle(objects)
    text = join_phrases([describe_object(o, rng) for o in objects])
    return _pick(SCENE_TEMPLATES, rng).format(objects=text)


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


# --- reading captions back -------------------------------------------------------------------------

_SIZE_OF = {w: size for size, words in SIZE_WORDS.items() for w in words}
_CELL_OF = {p.split(" ", 1)[1]: cell for cell, phrases in POSITION_PHRASES.items() for p in phrases}
_OBJECT_RE = re.compile(
    r"\b(?P<size>{sizes}) (?P<color>{colors}) (?P<shape>{shapes}) (?P<prep>at|in|on) (?P<where>{places})\b".format(
        sizes="|".join(_SIZE_OF), colors="|".join(COLORS), shapes="|".join(SHAPES),
        places="|".join(sorted((re.escape(k) for k in _CELL_OF), key=len, reverse=True))))


def parse_caption(text: str) -> Scene | None:
    """The scene a caption describes, or None if it names no complete object ('size colour shape where')."""
    objects = []
    for m in _OBJECT_RE.finditer(text.lower()):
        row, col = _CELL_OF[m["where"]]
        objects.append(Obj(row, col, m["shape"], m["color"], _SIZE_OF[m["size"]]))
    if not objects:
        return None
    try:
        return Scene(tuple(objects))
    except ValueError:  # two objects in one cell, or too many: not a valid ShapeWorld scene
        return None

