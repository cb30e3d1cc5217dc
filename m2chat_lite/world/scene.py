"""ShapeWorld scenes: coloured shapes on a 3×3 grid, and how to draw them.

Taught in notebook ``01_shapeworld``. A scene is a tuple of objects; each object has a shape, a colour,
a size and a cell of a 3×3 grid, and no two objects share a cell. Because the world is this small, every
picture has an exact ground truth, and ``oracle.read_scene`` can read it back from pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {  # name -> RGB; far apart from each other and from the background
    "red": (220, 38, 38),
    "green": (34, 160, 60),
    "blue": (37, 78, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 190),
    "cyan": (20, 190, 200),
}
SIZES = ("small", "large")
SIZE_FRACTION = {"small": 0.5, "large": 0.84}  # object extent as a fraction of its grid cell
BACKGROUND = (245, 243, 236)
GRID = 3
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
MAX_OBJECTS = 3

# Colour–shape pairs that never appear in training scenes: the held-out split measures composition
# (a model that knows "purple" and "triangle" separately should still draw a purple triangle).
HELD_OUT = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square")})
SPLITS = ("train", "heldout", "any")


@dataclass(frozen=True, order=True)
class Obj:
    """One object: ``row`` and ``col`` index the 3×3 grid (0 = top / left)."""

    row: int
    col: int
    shape: str
    color: str
    size: str

    def __post_init__(self):
        for value, valid, what in ((self.shape, SHAPES, "shape"), (self.color, tuple(COLORS), "colour"),
                                   (self.size, SIZES, "size")):
            if value not in valid:
                raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
        if not (0 <= self.row < GRID and 0 <= self.col < GRID):
            raise ValueError(f"cell ({self.row}, {self.col}) is outside the {GRID}×{GRID} grid")

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)

    @property
    def held_out(self) -> bool:
        return (self.color, self.shape) in HELD_OUT

    def moved(self, row: int, col: int) -> "Obj":
        return replace(self, row=row, col=col)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "row": self.row, "col": self.col}

    @classmethod
    def from_dict(cls, d: dict) -> "Obj":
        return cls(row=int(d["row"]), col=int(d["col"]), shape=d["shape"], color=d["color"], size=d["size"])


@dataclass(frozen=True)
class Scene:
    """A picture's ground truth: up to three objects in distinct cells, kept sorted by cell."""

    objects: tuple[Obj, ...]

    def __post_init__(self):
        objects = tuple(sorted(self.objects))
        cells = [o.cell for o in objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a cell in {objects}; each cell holds at most one object")
        if len(objects) > MAX_OBJECTS:
            raise ValueError(f"a scene holds at most {MAX_OBJECTS} objects, got {len(objects)}")
        object.__setattr__(self, "objects", objects)

    def __len__(self) -> int:
        return len(self.objects)

    def __iter__(self):
        return iter(self.objects)

    def at(self, row: int, col: int) -> Obj | None:
        return next((o for o in self.objects if o.cell == (row, col)), None)

    def free_cells(self) -> list[tuple[int, int]]:
        used = {o.cell for o in self.objects}
        return [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in used]

    def replace_object(self, old: Obj, new: Obj) -> "Scene":
        return Scene(tuple(new if o == old else o for o in self.objects))

    def add(self, obj: Obj) -> "Scene":
        return Scene(self.objects + (obj,))

    @property
    def held_out(self) -> bool:
        return any(o.held_out for o in self.objects)

    def to_dict(self) -> dict:
        return {"objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(tuple(Obj.from_dict(o) for o in d["objects"]))


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    return split


def allowed(obj: Obj, split: str) -> bool:
    """Training scenes never contain a held-out colour–shape pair; other splits may."""
    return split != "train" or not obj.held_out


def random_object(rng: random.Random, cell: tuple[int, int], split: str = "train",
                  shapes=SHAPES, colors=tuple(COLORS)) -> Obj:
    """A random object in ``cell`` whose colour–shape pair is allowed in ``split``."""
    while True:
        obj = Obj(cell[0], cell[1], rng.choice(shapes), rng.choice(colors), rng.choice(SIZES))
        if allowed(obj, split):
            return obj


def random_scene(rng: random.Random, n_objects: int | None = None, split: str = "train") -> Scene:
    """A random scene of ``n_objects`` (1–3, random if None) in distinct cells.

    ``split="train"`` avoids the held-out pairs, ``"heldout"`` puts at least one in, ``"any"`` is free.
    """
    check_split(split)
    n = n_objects if n_objects is not None else rng.randint(1, MAX_OBJECTS)
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be between 1 and {MAX_OBJECTS}, got {n}")
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    objects = [random_object(rng, cell, "train" if split == "train" else "any") for cell in cells]
    if split == "heldout" and not any(o.held_out for o in objects):
        color, shape = rng.choice(sorted(HELD_OUT))
        i = rng.randrange(n)
        objects[i] = replace(objects[i], color=color, shape=shape)
    return Scene(tuple(objects))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, fill) -> None:
    """Draw one shape filling the box of half-width ``half`` centred on (cx, cy)."""
    box = [cx - half, cy - half, cx + half, cy + half]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # an upright triangle filling the same box
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)


def object_half_extent(size: str, cell_px: float) -> float:
    return SIZE_FRACTION[size] * cell_px / 2


def render(scene: Scene, size: int = 32, supersample: int = 4) -> Image.Image:
    """Draw ``scene`` as a ``size``×``size`` RGB picture (antialiased by drawing ``supersample``× larger)."""
    if size < 12:
        raise ValueError(f"image size {size} is too small to draw a 3×3 grid of shapes; use 16 or more")
    big = size * supersample
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell_px = big / GRID
    for obj in scene:
        draw_shape(draw, obj.shape, (obj.col + 0.5) * cell_px, (obj.row + 0.5) * cell_px,
                   object_half_extent(obj.size, cell_px), COLORS[obj.color])
    return image.resize((size, size), Image.BOX) if supersample > 1 else image
