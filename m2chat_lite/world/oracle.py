"""The oracle: read a ShapeWorld scene back from pixels, and score a picture against what was asked.

Taught in notebook ``01_shapeworld``; every later notebook uses it to score generated pictures exactly.

How it reads a picture:
1. each pixel takes the nearest palette colour, or background if it is closer to the background or far
   from every colour (so blurry, noisy generated pictures still read);
2. foreground pixels are grouped into connected blobs (``scipy.ndimage.label``); specks are dropped;
3. a blob's colour is its majority colour and its cell is where its centre of mass lies;
4. its shape and size come from asking: which of the six candidates (3 shapes × 2 sizes), drawn at the
   blob's centre of mass, covers the pixels most like the blob does? Coverage is soft (a pixel halfway
   between the colour and the background counts one half), so antialiased edges and blur are fine, and
   centring on the blob rather than on the cell tolerates a shape drawn slightly off-centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .scene import (BACKGROUND, COLORS, GRID, MAX_OBJECTS, SHAPES, SIZES, Obj, Scene, draw_shape,
                    object_half_extent)

_NAMES = tuple(COLORS)
_PALETTE = np.array([BACKGROUND] + [COLORS[n] for n in _NAMES], dtype=np.float32)  # index 0 = background
_SUPERSAMPLE = 4


@dataclass
class Blob:
    """One connected foreground region as the oracle saw it (kept for plots and debugging)."""

    obj: Obj
    area: int  # pixels in the blob
    mismatch: float  # how far the blob's coverage is from the chosen candidate's (0 = identical)
    bbox: tuple[int, int, int, int]  # top, left, bottom, right (inclusive)


def _to_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"the oracle reads RGB pictures shaped [H, W, 3]; got an array of shape {arr.shape}")
    if arr.shape[0] != arr.shape[1]:
        raise ValueError(f"ShapeWorld pictures are square; got {arr.shape[1]}×{arr.shape[0]}")
    if arr.max() <= 1.0:  # accept floats in [0, 1]
        arr = arr * 255.0
    return arr


def label_pixels(image, max_distance: float = 90.0) -> np.ndarray:
    """Palette index per pixel: 0 for background, i>0 for colour ``COLORS`` name ``i-1``."""
    arr = _to_array(image)
    dist = np.linalg.norm(arr[:, :, None, :] - _PALETTE[None, None], axis=-1)
    labels = dist.argmin(-1)
    labels[dist.min(-1) > max_distance] = 0
    return labels


def coverage(arr: np.ndarray, color: str) -> np.ndarray:
    """Per pixel, how much of ``color`` lies over the background (0 = background, 1 = pure colour)."""
    bg, c = _PALETTE[0], np.array(COLORS[color], dtype=np.float32)
    return np.clip((arr - bg) @ (c - bg) / ((c - bg) @ (c - bg)), 0.0, 1.0)


def candidate_coverage(shape: str, size: str, cy: float, cx: float, image_size: int) -> np.ndarray:
    """Soft coverage of one shape drawn so that its centre of mass sits at (cy, cx)."""
    s = _SUPERSAMPLE
    half = object_half_extent(size, image_size * s / GRID)
    box_cy = cy * s - (half / 3 if shape == "triangle" else 0.0)  # a triangle's centroid is h/3 below its box centre
    canvas = Image.new("L", (image_size * s, image_size * s), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, cx * s, box_cy, half, 255)
    return np.asarray(canvas.resize((image_size, image_size), Image.BOX), dtype=np.float32) / 255.0


def read_blobs(image, min_area_fraction: float = 0.2, max_distance: float = 90.0) -> list[Blob]:
    """Every object-sized blob in ``image``, largest first (see the module docstring)."""
    arr = _to_array(image)
    labels = label_pixels(arr, max_distance)
    size = labels.shape[0]
    cell = size / GRID
    min_area = min_area_fraction * (2 * object_half_extent("small", cell)) ** 2
    components, _ = ndimage.label(labels > 0)
    blobs = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        mask = components == index
        area = int(mask[box].sum())
        if area < min_area:
            continue
        color = _NAMES[np.bincount(labels[mask], minlength=len(_PALETTE))[1:].argmax()]
        region = ndimage.binary_dilation(mask, iterations=2)  # the blob and its soft edge, nothing else
        alpha = coverage(arr, color) * region
        cy, cx = np.add(ndimage.center_of_mass(alpha), 0.5)  # pixel i spans [i, i+1): its centre is i + 0.5
        mismatch, shape, size_name = min(
            (np.abs(alpha - candidate_coverage(sh, sz, cy, cx, size) * region).sum() / alpha.sum(), sh, sz)
            for sh in SHAPES for sz in SIZES)
        obj = Obj(row=min(int(cy // cell), GRID - 1), col=min(int(cx // cell), GRID - 1),
                  shape=shape, color=color, size=size_name)
        blobs.append(Blob(obj, area, float(mismatch), (box[0].start, box[1].start, box[0].stop - 1, box[1].stop - 1)))
    return sorted(blobs, key=lambda b: -b.area)


def read_objects(image, **kwargs) -> list[Obj]:
    """Every object the oracle sees, one per cell (if two blobs land in one cell, the larger wins)."""
    by_cell: dict[tuple[int, int], Obj] = {}
    for blob in read_blobs(image, **kwargs):
        by_cell.setdefault(blob.obj.cell, blob.obj)
    return sorted(by_cell.values())


def read_scene(image, **kwargs) -> Scene:
    """The scene the oracle sees in ``image`` (at most three objects: the largest are kept)."""
    objects = read_objects(image, **kwargs)
    if len(objects) > MAX_OBJECTS:
        largest = {b.obj for b in read_blobs(image, **kwargs)[:MAX_OBJECTS]}
        objects = [o for o in objects if o in largest]
    return Scene(tuple(objects))


ATTRIBUTES = ("position", "shape", "color", "size")


def score(image, target: Scene) -> dict[str, float]:
    """How well ``image`` shows ``target``, from the oracle's reading.

    Objects are matched by cell. ``position``: the fraction of target objects with something in their
    cell; ``shape`` / ``color`` / ``size``: the fraction drawn there with that attribute right;
    ``count``: 1 if the number of objects seen matches; ``exact``: 1 if the reading equals the target.
    """
    seen = {o.cell: o for o in read_objects(image)}
    n = max(len(target), 1)
    matched = [(t, seen.get(t.cell)) for t in target]
    result = {"position": sum(s is not None for _, s in matched) / n}
    for attr in ("shape", "color", "size"):
        result[attr] = sum(s is not None and getattr(s, attr) == getattr(t, attr) for t, s in matched) / n
    result["count"] = float(len(seen) == len(target))
    result["exact"] = float(sorted(seen.values()) == list(target.objects))
    return result
