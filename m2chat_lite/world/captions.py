"""Words for ShapeWorld: a small grammar that describes objects and scenes, and reads captions back.

Taught in notebook ``01_shapeworld``. Every fact has several phrasings ("a big red circle at the top
left", "there is a large red circle in the top left corner") so the models learn meanings, not strings;
``rng=None`` always picks the first phrasing, which gives one canonical caption per scene.
``parse_caption`` inverts the grammar, so any caption the package writes can be turned back into a scene.
"""

from __future__ import annotations

import random
import re
from dataclasses import replace

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
_PLACES = "|".join(sorted((re.escape(k) for k in _CELL_OF), key=len, reverse=True))  # longest first
_OBJECT_RE = re.compile(
    r"\b(?P<size>{sizes}) (?P<color>{colors}) (?P<shape>{shapes}) (?P<prep>at|in|on) (?P<where>{places})\b".format(
        sizes="|".join(_SIZE_OF), colors="|".join(COLORS), shapes="|".join(SHAPES), places=_PLACES))


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


# --- reading a story back --------------------------------------------------------------------------

_NOUN_RE = re.compile(r"\b(?P<size>{sizes}) (?P<color>{colors}) (?P<shape>{shapes})\b".format(
    sizes="|".join(_SIZE_OF), colors="|".join(COLORS), shapes="|".join(SHAPES)))
_PLACE_RE = re.compile(rf"\b(?:at|in|on|to) (?P<where>{_PLACES})\b")
_NAMED_RE = re.compile(r"\bthe (?:(?P<color>{colors}) )?(?P<shape>{shapes})\b".format(
    colors="|".join(COLORS), shapes="|".join(SHAPES)))
_TURNS_RE = re.compile(r"\b(?:turns|becomes) (?P<color>{colors})\b".format(colors="|".join(COLORS)))


def _read_event(text: str, hero: Obj, scene: Scene) -> tuple[Obj, Scene] | None:
    """What one sentence does to the hero and the scene, or None if it says nothing readable."""
    friend = parse_caption(text)
    if friend is not None and ("meets" in text or "friend" in text):
        return (hero, scene.add(friend.objects[0])) if len(friend) == 1 else None
    named = _NAMED_RE.search(text)
    if named is None or named["shape"] != hero.shape or named["color"] not in (None, hero.color):
        return None  # the sentence is not about the hero
    if "grows big" in text or "shrinks" in text:
        new = replace(hero, size="large" if "grows big" in text else "small")
    elif turned := _TURNS_RE.search(text):
        new = replace(hero, color=turned["color"])
    elif place := _PLACE_RE.search(text):
        new = hero.moved(*_CELL_OF[place["where"]])
    else:
        return None
    return new, scene.replace_object(hero, new)


def read_story(sentences) -> list[Scene | None]:
    """The scene after each sentence of a story told in the stories' grammar (``tasks.stories``), so that a
    story the system writes in its own words can be scored picture by picture. The first sentence introduces
    the hero and its place ("once upon a time there was a big red circle at the top left."); each later one
    says one thing that happens to the hero (it moves, grows or shrinks, changes colour) or a friend who
    joins the scene ("the red circle meets a small blue square on the right."). ``None`` from the first
    sentence that cannot be read, or whose scene cannot be (a move or a friend onto a cell already taken): a
    story that stops making sense is not scored from there on."""
    scenes, hero, scene = [], None, None
    for i, sentence in enumerate(sentences):
        text = sentence.lower()
        if i == 0:
            noun, place = _NOUN_RE.search(text), _PLACE_RE.search(text)
            if noun and place:
                hero = Obj(*_CELL_OF[place["where"]], noun["shape"], noun["color"], _SIZE_OF[noun["size"]])
                scene = Scene((hero,))
        elif scene is not None:
            try:
                hero, scene = _read_event(text, hero, scene) or (None, None)
            except ValueError:  # two objects in one cell, or more than the grid allows
                hero, scene = None, None
        scenes.append(scene)
    return scenes
