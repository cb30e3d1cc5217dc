"""Interleaved samples: the one data format, its readers and writers, datasets and collators.

Taught in notebook ``01_shapeworld`` (the format and the real-data readers); used by every later
training stage (``07_m3ft_stage1_alignment``, ``08_m3ft_stage2_instruction``) through
:class:`SampleDataset`, :class:`CaptionCollator` and :class:`ChatCollator`.

In memory a **sample** is a list of chat turns whose content interleaves text and pictures::

    Sample(id="s1", task="story", turns=[
        Turn("user", [Text("Tell me a story with pictures.")]),
        Turn("assistant", [Text("A red circle wakes up."), Image(pil_image), Text("It rolls away."), Image(...)]),
    ], meta={...})

On disk it is JSON Lines, one sample per line, mirroring Hugging Face's chat format; image paths are
relative to the JSONL file::

    {"id": "s1", "meta": {}, "task": "story", "turns": [{"role": "user", "content": [
        {"type": "text", "text": "..."}, {"type": "image", "image": "images/s1-0.png"}]}]}

Real datasets are mapped into the same format by :func:`read_vist` (stories), :func:`read_mmdialog`
(dialogues) and :func:`read_caption_pairs` (image-caption pairs); ``data/samples/README.md`` describes
each layout. :func:`load_image` is the one place a picture is opened and normalised.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from .utils import atomic_write, atomic_write_bytes

ROLES = ("system", "user", "assistant")
TASKS = ("caption", "story", "dialogue", "vqa")
STORY_PROMPT = "Tell me a story with pictures."  # the user turn of every VIST story
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")

# -----------------------------------------------------------------------------
# the format in memory


@dataclass
class Text:
    text: str

    def __post_init__(self):
        if not isinstance(self.text, str):
            raise TypeError(f"Text.text must be a str, got {type(self.text).__name__}")


@dataclass
class Image:
    """A picture in a turn: ``image`` is the loaded RGB picture, ``path`` where it lives on disk.

    After :func:`read_jsonl` ``path`` is the resolved file path (the JSONL stores it relative to itself);
    with ``load_images=False`` only ``path`` is set and the picture is loaded when needed.
    """

    image: PIL.Image.Image | None = None
    path: str | None = None

    def __post_init__(self):
        if self.image is None and self.path is None:
            raise ValueError("Image needs a picture or a path: pass Image(image=pil_image) or Image(path='x.png')")
        if self.image is not None and not isinstance(self.image, PIL.Image.Image):
            raise TypeError(f"Image.image must be a PIL.Image.Image, got {type(self.image).__name__}")
        if self.path is not None:
            self.path = os.fspath(self.path)

    def load(self, size: int | None = None, mode: str = "RGB") -> PIL.Image.Image:
        """The picture, normalised by :func:`load_image` (opened from ``path`` if not loaded)."""
        return load_image(self.image if self.image is not None else self.path, size=size, mode=mode)


Segment = Union[Text, Image]


@dataclass
class Turn:
    role: str
    content: list  # list[Segment]

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; valid roles are {', '.join(ROLES)}")
        if not isinstance(self.content, list):
            raise TypeError(f"Turn.content must be a list of Text/Image segments, got {type(self.content).__name__}")
        for i, seg in enumerate(self.content):
            if not isinstance(seg, (Text, Image)):
                raise TypeError(f"Turn.content[{i}] must be Text or Image, got {type(seg).__name__}")


@dataclass
class Sample:
    id: str
    task: str
    turns: list  # list[Turn]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"Sample.id must be a non-empty str, got {self.id!r}")
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; valid tasks are {', '.join(TASKS)}")
        if not isinstance(self.turns, list) or not all(isinstance(t, Turn) for t in self.turns):
            raise TypeError("Sample.turns must be a list of Turn")
        if not isinstance(self.meta, dict):
            raise TypeError(f"Sample.meta must be a dict, got {type(self.meta).__name__}")

    def images(self) -> list[Image]:
        """All Image segments, in order."""
        return [s for t in self.turns for s in t.content if isinstance(s, Image)]

    def text(self) -> str:
        """Plain text: the text segments of a turn joined by spaces, turns joined by newlines."""
        turns = (" ".join(s.text for s in t.content if isinstance(s, Text)) for t in self.turns)
        return "\n".join(t for t in turns if t)

    def to_messages(self) -> tuple[list[dict], list[PIL.Image.Image]]:
        """Hugging Face chat messages and the pictures in the order of their ``{"type": "image"}`` parts."""
        messages, pictures = [], []
        for t in self.turns:
            content = []
            for s in t.content:
                if isinstance(s, Text):
                    content.append({"type": "text", "text": s.text})
                else:
                    content.append({"type": "image"})
                    pictures.append(s.load())
            messages.append({"role": t.role, "content": content})
        return messages, pictures


# -----------------------------------------------------------------------------
# pictures


def _to_rgb(im: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on white; 16-bit values are scaled to 8 bits."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        # I;16 is 16-bit by definition; a 32-bit "I" image (how some files decode) is treated as 16-bit
        # when it holds values above 255, else as 8-bit
        if im.mode != "I" or a.max(initial=0) > 255:
            a = a / 257.0
        im = PIL.Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        im = PIL.Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        im = im.convert("RGBA")
        white = PIL.Image.new("RGBA", im.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, ...


def load_image(path_or_pil, size: int | None = None, mode: str = "RGB") -> PIL.Image.Image:
    """Open (if a path) and normalise a picture: the one place images enter the package.

    - any mode (L, P, RGBA, CMYK, 16-bit, ...) becomes RGB; transparency is composited on white;
    - a file's EXIF orientation is applied (photos from phones);
    - ``size``: make it a ``size`` x ``size`` square: centre-crop the largest square, then resize
      (bicubic). Cropping keeps proportions; the border of a non-square picture is lost;
    - ``mode``: ``"RGB"`` (default) or ``"L"`` (grey, converted from the RGB result).

    Raises FileNotFoundError for a missing file, ValueError for an empty, corrupt or zero-size picture.
    May return the same object when it is already RGB and needs no resizing.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"image mode must be 'RGB' or 'L', got {mode!r}")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise ValueError(f"image size must be a positive int (the side of the square), got {size!r}")
    if isinstance(path_or_pil, PIL.Image.Image):
        im = path_or_pil
    elif isinstance(path_or_pil, (str, os.PathLike)):
        p = os.path.abspath(os.fspath(path_or_pil))
        if not os.path.isfile(p):
            raise FileNotFoundError(f"image file not found: {p}")
        try:
            with PIL.Image.open(p) as f:
                f.load()  # decode now: a truncated file fails here, not later
                im = PIL.ImageOps.exif_transpose(f)
                if im is f:
                    im = f.copy()
        except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image {p}: {e}; the file is empty, corrupt or not a picture") from None
    else:
        raise TypeError(f"load_image expects a path or a PIL image, got {type(path_or_pil).__name__}")
    if im.width == 0 or im.height == 0:
        where = f" {os.path.abspath(path_or_pil)}" if not isinstance(path_or_pil, PIL.Image.Image) else ""
        raise ValueError(f"image{where} has zero size {im.size}")
    im = _to_rgb(im)
    if size is not None and im.size != (size, size):
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.resize((size, size), PIL.Image.Resampling.BICUBIC, box=(left, top, left + s, top + s))
    if mode == "L":
        im = im.convert("L")
    return im


def image_to_tensor(img) -> torch.Tensor:
    """PIL picture (any mode) -> float tensor ``[3, H, W]`` in ``[-1, 1]``."""
    a = np.asarray(load_image(img), dtype=np.float32)
    return torch.from_numpy(a).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


def tensor_to_image(t: torch.Tensor) -> PIL.Image.Image:
    """Inverse of :func:`image_to_tensor`: ``[3, H, W]`` (or ``[1, 3, H, W]``) in ``[-1, 1]`` -> RGB picture.

    Values outside ``[-1, 1]`` are clamped."""
    t = t.detach().float().cpu()
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3 or t.shape[0] != 3:
        raise ValueError(f"expected a [3, H, W] image tensor, got shape {tuple(t.shape)}")
    a = ((t.clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return PIL.Image.fromarray(np.ascontiguousarray(a), "RGB")


# -----------------------------------------------------------------------------
# writing: atomic and deterministic


_SAVE_OPTIONS = {"png": ("PNG", ".png", {"optimize": False, "compress_level": 6}),
                 "jpeg": ("JPEG", ".jpg", {"quality": 95, "optimize": False, "subsampling": 0})}


def _file_stem(sample_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", sample_id).lstrip(".") or "sample"


def write_jsonl(samples: Sequence[Sample], path, image_dir: str = "images", image_format: str = "png") -> str:
    """Write samples as JSON Lines; each picture goes to ``<dir of path>/<image_dir>/<sample id>-<n>.png``.

    Nothing is written unless every sample serialises; each file is written atomically (temp file, then
    ``os.replace``). The same input gives the same bytes (sorted keys, fixed PNG options, no metadata),
    so checksums are stable. Characters of the id other than letters, digits, ``. _ -`` become ``_``
    in file names. Returns ``path`` as a str.
    """
    path = os.fspath(path)
    fmt = image_format.lower().replace("jpg", "jpeg")
    if fmt not in _SAVE_OPTIONS:
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    pil_format, ext, options = _SAVE_OPTIONS[fmt]
    if os.path.isabs(image_dir) or ".." in Path(image_dir).parts:
        raise ValueError(f"image_dir must be a folder inside the JSONL's folder, got {image_dir!r}")
    root = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"folder {root} does not exist; create it before writing {path}")

    # 1. serialise everything first: a bad sample fails before any file is touched
    lines, pictures, stems = [], [], {}
    for i, s in enumerate(samples):
        if not isinstance(s, Sample):
            raise TypeError(f"samples[{i}] is a {type(s).__name__}, not a Sample")
        stem = _file_stem(s.id)
        if stem in stems:
            raise ValueError(f"samples[{stems[stem]}] and samples[{i}] share the id (or file name) {s.id!r}; "
                             "sample ids must be unique")
        stems[stem] = i
        n, turns = 0, []
        for t in s.turns:
            content = []
            for seg in t.content:
                if isinstance(seg, Text):
                    content.append({"type": "text", "text": seg.text})
                else:
                    rel = Path(image_dir, f"{stem}-{n}{ext}").as_posix()
                    content.append({"type": "image", "image": rel})
                    pictures.append((os.path.join(root, rel), seg, s.id, n))
                    n += 1
            turns.append({"role": t.role, "content": content})
        obj = {"id": s.id, "task": s.task, "turns": turns, "meta": s.meta}
        try:
            lines.append(json.dumps(obj, sort_keys=True, ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"sample {s.id!r}: meta is not JSON-serialisable ({e}); use plain dicts, lists, "
                             "str, int, float (not NaN), bool or None, e.g. array.tolist()") from None

    # 2. pictures, each atomically; 3. the JSONL last, so it never points at a missing picture
    if pictures:
        os.makedirs(os.path.join(root, image_dir), exist_ok=True)
    for target, seg, sid, n in pictures:
        try:
            pic = seg.load()
        except (OSError, ValueError) as e:
            raise type(e)(f"sample {sid!r} image {n}: {e}") from None
        clean = PIL.Image.frombytes("RGB", pic.size, pic.tobytes())  # drop info/ICC/EXIF: stable bytes
        with atomic_write(target, "wb") as f:
            clean.save(f, format=pil_format, **options)
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    atomic_write_bytes(path, data)
    return path


# -----------------------------------------------------------------------------
# reading


def _parse_segment(item, base_dir: str, load_images: bool, image_size, image_mode) -> Segment:
    if not isinstance(item, dict) or item.get("type") not in ("text", "image"):
        raise ValueError(f"content item {item!r} must be {{'type': 'text', 'text': ...}} "
                         "or {'type': 'image', 'image': 'relative/path.png'}")
    if item["type"] == "text":
        if not isinstance(item.get("text"), str):
            raise ValueError(f"text item {item!r} needs a string 'text'")
        return Text(item["text"])
    if not isinstance(item.get("image"), str) or not item["image"]:
        raise ValueError(f"image item {item!r} needs 'image': a path relative to the JSONL file")
    p = os.path.normpath(os.path.join(base_dir, item["image"]))
    return Image(load_image(p, size=image_size, mode=image_mode) if load_images else None, p)


def _parse_sample(obj, base_dir, load_images, image_size, image_mode) -> Sample:
    if not isinstance(obj, dict) or not isinstance(obj.get("turns"), list):
        raise ValueError("expected a JSON object with 'turns' (a list of {'role': ..., 'content': [...]})")
    for key in ("id", "task"):
        if key not in obj:
            raise ValueError(f"missing field {key!r}; every sample needs 'id', 'task' and 'turns'")
    turns = []
    for k, t in enumerate(obj["turns"]):
        if not isinstance(t, dict) or "role" not in t or "content" not in t:
            raise ValueError(f"turn {k} must be an object with 'role' and 'content'")
        content = t["content"]
        if isinstance(content, str):  # HF also allows a bare string
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise ValueError(f"turn {k}: 'content' must be a list of text/image items")
        try:
            turns.append(Turn(t["role"], [_parse_segment(c, base_dir, load_images, image_size, image_mode)
                                          for c in content]))
        except (OSError, ValueError, TypeError) as e:
            raise type(e)(f"turn {k}: {e}") from None
    meta = obj.get("meta", {})
    return Sample(str(obj["id"]), obj["task"], turns, meta if meta is not None else {})


def iter_jsonl(path, load_images: bool = True, image_size: int | None = None,
               image_mode: str = "RGB") -> Iterator[Sample]:
    """Stream the samples of a JSONL file one by one (see :func:`read_jsonl`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; check the path (relative paths start at {os.getcwd()})")
    base_dir = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text ({e}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); "
                                 "each line must be one complete JSON object") from None
            try:
                yield _parse_sample(obj, base_dir, load_images, image_size, image_mode)
            except (OSError, ValueError, TypeError) as e:
                raise type(e)(f"{where}: {e}") from None


def read_jsonl(path, load_images: bool = True, image_size: int | None = None, image_mode: str = "RGB",
               allow_empty: bool = False) -> list[Sample]:
    """Read a JSONL file of samples (blank lines are skipped).

    ``load_images=False`` keeps only each picture's resolved path (loaded later by :meth:`Image.load`,
    :meth:`Sample.to_messages` or the collators). ``image_size``/``image_mode``: see :func:`load_image`.
    Every error names the file and line. A file with no samples is an error unless ``allow_empty``.
    """
    samples = list(iter_jsonl(path, load_images, image_size, image_mode))
    if not samples and not allow_empty:
        raise ValueError(f"{os.fspath(path)} contains no samples; a dataset needs at least one - check the file "
                         "was written completely, or pass allow_empty=True")
    return samples


# -----------------------------------------------------------------------------
# real-data readers


def _load_json(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None


def _find_image(root: str, stem: str) -> str | None:
    for ext in (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".gif"):
        p = os.path.join(root, stem + ext)
        if os.path.isfile(p):
            return p
    return None


def _picture(p: str, load_images: bool, image_size) -> Image:
    return Image(load_image(p, size=image_size) if load_images else None, os.path.abspath(p))


def read_vist(path, image_root, text_field: str = "text", load_images: bool = True,
              image_size: int | None = None, skip_missing: bool = False) -> list[Sample]:
    """Read a VIST "SIS" story file into ``task="story"`` samples.

    Layout (visionandlanguage.net/VIST, e.g. ``train.story-in-sequence.json``)::

        {"images": [{"id": "1741642", ...}, ...],
         "annotations": [[{"story_id": "30355", "photo_flickr_id": "1741642",
                           "worker_arranged_photo_order": 0, "text": "...", "original_text": "...",
                           "album_id": "...", ...}], ...]}

    Annotations are grouped by ``story_id`` (stories in order of first appearance) and ordered by
    ``worker_arranged_photo_order``. The picture is ``<image_root>/<photo_flickr_id>.jpg`` (also .png,
    .jpeg, .gif). Each story becomes a user turn :data:`STORY_PROMPT` and an assistant turn alternating
    ``Text(sentence), Image`` per frame. ``text_field``: ``"text"`` (VIST's lower-cased, tokenised,
    name-anonymised text) or ``"original_text"`` (as the worker wrote it). A missing picture is an error
    naming the file, unless ``skip_missing`` (the story is skipped; one warning gives the count).
    """
    data = _load_json(path)
    path = os.fspath(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: expected a VIST SIS object with an 'annotations' list; "
                         "is this a story-in-sequence (SIS) file?")
    stories: dict[str, list[dict]] = {}
    for i, a in enumerate(data["annotations"]):
        if isinstance(a, list) and len(a) == 1:
            a = a[0]
        need = ("story_id", "photo_flickr_id", "worker_arranged_photo_order", text_field)
        if not isinstance(a, dict) or any(k not in a for k in need):
            raise ValueError(f"{path}: annotations[{i}] must be a 1-element list holding a dict with "
                             f"{', '.join(need)}; got {a!r:.200}")
        stories.setdefault(str(a["story_id"]), []).append(a)
    samples, skipped = [], 0
    for sid, frames in stories.items():
        frames = sorted(frames, key=lambda a: int(a["worker_arranged_photo_order"]))
        content, missing = [], None
        for a in frames:
            p = _find_image(os.fspath(image_root), str(a["photo_flickr_id"]))
            if p is None:
                missing = os.path.abspath(os.path.join(image_root, f"{a['photo_flickr_id']}.jpg"))
                break
            content += [Text(str(a[text_field]).strip()), _picture(p, load_images, image_size)]
        if missing:
            if skip_missing:
                skipped += 1
                continue
            raise FileNotFoundError(f"{path}: story {sid}: image {missing} not found (also tried .png, .jpeg, "
                                    ".gif); check image_root or pass skip_missing=True")
        meta = {"source": "vist", "story_id": sid, "album_id": frames[0].get("album_id"),
                "photo_flickr_ids": [str(a["photo_flickr_id"]) for a in frames]}
        samples.append(Sample(f"vist-{sid}", "story",
                              [Turn("user", [Text(STORY_PROMPT)]), Turn("assistant", content)], meta))
    if skipped:
        warnings.warn(f"read_vist: skipped {skipped} of {len(stories)} stories with missing images", stacklevel=2)
    return samples


_SPEAKERS = {0: "user", 1: "assistant", "0": "user", "1": "assistant", "user": "user", "assistant": "assistant"}


def read_mmdialog(path, image_root=None, load_images: bool = True, image_size: int | None = None,
                  skip_missing: bool = False) -> list[Sample]:
    """Read MMDialog-style dialogues (JSON Lines, one conversation per line) into ``task="dialogue"``.

    The layout we read (MMDialog, github.com/victorsungo/MMDialog, stores each turn as a dict with
    ``turn_id``, ``text`` and ``images``; we put a conversation on one line)::

        {"conversation_id": "c1", "conversation": [
            {"turn_id": 0, "speaker": 0, "text": "...", "images": ["a.jpg"]}, ...]}

    Turns are ordered by ``turn_id``. ``speaker`` 0 or "user" -> user, 1 or "assistant" -> assistant;
    without ``speaker`` turns alternate starting with the user. Consecutive turns of the same speaker are
    merged into one turn. A turn's content is its text (if any) then its pictures, found in ``image_root``
    (default: the JSONL's folder). An empty conversation is an error; so is a missing picture, unless
    ``skip_missing`` (the conversation is skipped; one warning gives the count).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    samples, skipped, total = [], 0, 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            total += 1
            where = f"{path} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("conversation"), list):
                raise ValueError(f"{where}: expected a JSON object with 'conversation' (a list of turns)")
            conv = obj["conversation"]
            if not conv:
                raise ValueError(f"{where}: conversation {obj.get('conversation_id', '?')} is empty; "
                                 "a dialogue needs at least one turn")
            if all(isinstance(t, dict) and "turn_id" in t for t in conv):
                conv = sorted(conv, key=lambda t: int(t["turn_id"]))
            turns, missing = [], None
            for k, t in enumerate(conv):
                if not isinstance(t, dict):
                    raise ValueError(f"{where}: turn {k} must be an object with 'text' and/or 'images'")
                speaker = t.get("speaker", k % 2)
                if speaker not in _SPEAKERS:
                    raise ValueError(f"{where}: turn {k} has speaker {speaker!r}; use 0/'user' or 1/'assistant'")
                role = _SPEAKERS[speaker]
                content = [Text(t["text"])] if isinstance(t.get("text"), str) and t["text"].strip() else []
                for name in t.get("images") or []:
                    p = os.path.join(root, str(name))
                    if not os.path.isfile(p):
                        missing = os.path.abspath(p)
                        break
                    try:
                        content.append(_picture(p, load_images, image_size))
                    except ValueError as e:
                        raise ValueError(f"{where}: {e}") from None
                if missing:
                    break
                if not content:
                    continue
                if turns and turns[-1].role == role:
                    turns[-1].content.extend(content)
                else:
                    turns.append(Turn(role, content))
            if missing:
                if skip_missing:
                    skipped += 1
                    continue
                raise FileNotFoundError(f"{where}: image {missing} not found; check image_root or pass "
                                        "skip_missing=True")
            if not turns:
                raise ValueError(f"{where}: conversation {obj.get('conversation_id', '?')} has no text or images")
            cid = str(obj.get("conversation_id", lineno))
            samples.append(Sample(f"mmdialog-{cid}", "dialogue", turns, {"source": "mmdialog", "conversation_id": cid}))
    if skipped:
        warnings.warn(f"read_mmdialog: skipped {skipped} of {total} conversations with missing images", stacklevel=2)
    return samples


def read_caption_pairs(path_or_dir, prompt: str = "{caption}", load_images: bool = True,
                       image_size: int | None = None, skip_missing: bool = False) -> list[Sample]:
    """Read image-caption pairs into ``task="caption"`` samples: a user turn with the request
    ``prompt.format(caption=...)`` (default: the caption itself) and an assistant turn with the picture.
    The caption is also kept in ``meta["caption"]`` (what :class:`CaptionCollator` reads).

    Two layouts:

    - a folder (searched recursively, sorted) of pictures with a same-stem ``.txt`` caption beside each,
      e.g. ``cat.png`` + ``cat.txt``; this is also what img2dataset writes for CC3M
      (``00000/000000001.jpg`` + ``.txt``). Ids are the relative path without extension.
    - a JSONL file of ``{"image": "file.png", "caption": "...", "id": optional}``, image paths relative
      to the JSONL file.

    A picture without a caption (or a missing picture) is an error unless ``skip_missing``.
    """
    src = os.fspath(path_or_dir)
    pairs = []  # (id, image path, caption)
    if os.path.isdir(src):
        for p in sorted(Path(src).rglob("*")):
            if p.suffix.lower() not in IMAGE_EXTENSIONS or not p.is_file():
                continue
            txt = p.with_suffix(".txt")
            if not txt.is_file():
                if skip_missing:
                    continue
                raise FileNotFoundError(f"{p.resolve()} has no caption file {txt.name}; write the caption there "
                                        "or pass skip_missing=True")
            rel = p.relative_to(src).with_suffix("").as_posix().replace("/", "-")
            pairs.append((f"caption-{rel}", str(p), txt.read_text(encoding="utf-8").strip()))
    elif os.path.isfile(src):
        base = os.path.dirname(os.path.abspath(src))
        with open(src, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{src} line {lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) \
                        or not isinstance(obj.get("caption"), str):
                    raise ValueError(f"{where}: expected {{'image': 'file.png', 'caption': '...'}}")
                p = os.path.join(base, obj["image"])
                if not os.path.isfile(p):
                    if skip_missing:
                        continue
                    raise FileNotFoundError(f"{where}: image {os.path.abspath(p)} not found; check the path "
                                            "(relative to the JSONL file) or pass skip_missing=True")
                sid = str(obj.get("id", f"caption-{Path(src).stem}-{lineno}"))
                pairs.append((sid, p, obj["caption"].strip()))
    else:
        raise FileNotFoundError(f"{src}: no such file or folder; pass a folder of image+.txt pairs or a JSONL file")
    samples = []
    for sid, p, caption in pairs:
        samples.append(Sample(sid, "caption", [Turn("user", [Text(prompt.format(caption=caption))]),
                                               Turn("assistant", [_picture(p, load_images, image_size)])],
                              {"source": "captions", "caption": caption}))
    return samples


# -----------------------------------------------------------------------------
# torch: dataset and collators


class SampleDataset(torch.utils.data.Dataset):
    """A map-style dataset of Samples, from a list or a JSONL path (read with :func:`read_jsonl`).

    ``transform(sample)``, if given, is applied on access. Extra keyword arguments go to ``read_jsonl``."""

    def __init__(self, samples_or_path, transform: Callable | None = None, **read_kwargs):
        if isinstance(samples_or_path, (str, os.PathLike)):
            samples_or_path = read_jsonl(samples_or_path, **read_kwargs)
        self.samples = list(samples_or_path)
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        return self.transform(s) if self.transform is not None else s


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        raise ValueError("the tokenizer has no pad token; set one, e.g. tokenizer.pad_token = tokenizer.eos_token")
    return pad


def _pad(rows: list[list[int]], value: int, length: int | None = None) -> torch.Tensor:
    n = max([len(r) for r in rows] + [length or 0])
    out = torch.full((len(rows), n), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class CaptionCollator:
    """Batch of caption samples -> ``pixel_values [B,3,H,W]`` in [-1,1], ``input_ids``, ``attention_mask``
    (right-padded with the tokenizer's pad id, truncated to ``max_length``) and ``captions``.

    The caption is ``meta["caption"]`` if present, else ``sample.text()``; the picture is the sample's
    first image, made square by :func:`load_image`. ``padding="max_length"`` pads every batch to
    ``max_length`` (what CLIP-style text encoders expect); ``"longest"`` to the longest caption.
    """

    def __init__(self, tokenizer, image_size: int, max_length: int, padding: str = "longest"):
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        self.tokenizer, self.image_size, self.max_length, self.padding = tokenizer, image_size, max_length, padding
        self.pad_id = _pad_id(tokenizer)

    def __call__(self, batch: Sequence[Sample]) -> dict:
        captions, pictures, ids = [], [], []
        for s in batch:
            if s.task != "caption":
                raise ValueError(f"CaptionCollator got sample {s.id!r} with task {s.task!r}; it takes caption "
                                 "samples only (use ChatCollator for stories, dialogues, vqa)")
            imgs = s.images()
            if not imgs:
                raise ValueError(f"caption sample {s.id!r} has no image")
            caption = s.meta.get("caption", s.text())
            captions.append(caption)
            pictures.append(image_to_tensor(imgs[0].load(size=self.image_size)))
            ids.append(list(self.tokenizer(caption, truncation=True, max_length=self.max_length)["input_ids"]))
        length = self.max_length if self.padding == "max_length" else None
        input_ids = _pad(ids, self.pad_id, length)
        attention_mask = _pad([[1] * len(r) for r in ids], 0, length)
        return {"pixel_values": torch.stack(pictures), "input_ids": input_ids,
                "attention_mask": attention_mask, "captions": captions}


class ChatCollator:
    """Batch of any samples -> the LM's training batch, via ``m2chat_lite.tokenizer.encode_chat``.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (right-padded; labels with -100),
    ``pixel_values [N,3,H,W]`` (every picture of the batch, in order), ``image_batch_index [N]`` (the sample
    each picture belongs to) and ``image_positions`` (per sample, the token positions from ``encode_chat``).
    When ``max_length`` truncates a sample, pictures whose positions were cut off are dropped too.
    """

    def __init__(self, tokenizer, image_size: int, max_length: int | None = None):
        from m2chat_lite.tokenizer import encode_chat  # lazy: tokenizer.py may import this module

        self.encode_chat = encode_chat
        self.tokenizer, self.image_size, self.max_length = tokenizer, image_size, max_length
        self.pad_id = _pad_id(tokenizer)

    def __call__(self, batch: Sequence[Sample]) -> dict:
        ids, labels, positions, pictures, owner = [], [], [], [], []
        for b, s in enumerate(batch):
            messages, imgs = s.to_messages()
            enc = self.encode_chat(self.tokenizer, messages, max_length=self.max_length)
            pos = list(enc["image_positions"])
            if len(pos) > len(imgs):
                raise ValueError(f"sample {s.id!r}: encode_chat found {len(pos)} image positions but the sample "
                                 f"has {len(imgs)} pictures")
            ids.append(list(enc["input_ids"]))
            labels.append(list(enc["labels"]))
            positions.append(pos)
            for img in imgs[:len(pos)]:
                pictures.append(image_to_tensor(load_image(img, size=self.image_size)))
                owner.append(b)
        pixel_values = torch.stack(pictures) if pictures else torch.zeros(0, 3, self.image_size, self.image_size)
        return {"input_ids": _pad(ids, self.pad_id), "attention_mask": _pad([[1] * len(r) for r in ids], 0),
                "labels": _pad(labels, -100), "pixel_values": pixel_values,
                "image_batch_index": torch.tensor(owner, dtype=torch.long), "image_positions": positions}
