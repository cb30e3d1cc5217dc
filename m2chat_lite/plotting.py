"""Pictures for the course: image grids, illustrated stories, conversations, the oracle's view and the
M²Chat pipeline diagram.

Introduced in notebooks ``00_welcome`` and ``01_shapeworld``; every later notebook draws with it.
Figures are small matplotlib figures (they are committed inside executed notebooks); conversations are
HTML with the pictures embedded, so they show in Jupyter and can be saved as a self-contained page.
"""

from __future__ import annotations

import base64
import html
import io
import textwrap

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle
from PIL import Image as PILImage

from .data import Image, Sample, Text


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image):
        image = image.load()
    return np.asarray(image.convert("RGB") if isinstance(image, PILImage.Image) else image)


def show_images(images, titles=None, ncols: int = 8, size: float = 1.2, suptitle: str | None = None):
    """A grid of pictures (PIL, arrays or ``data.Image`` segments) with optional titles."""
    images = list(images)
    if not images:
        raise ValueError("show_images needs at least one picture")
    ncols = min(ncols, len(images))
    nrows = -(-len(images) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.3 if titles else 0)),
                             squeeze=False, layout="constrained")
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(_as_array(images[i]), interpolation="nearest")
            if titles is not None:
                ax.set_title(textwrap.fill(str(titles[i]), 18), fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return fig


def show_story(sentences, images, size: float = 1.7, width: int = 22, title: str | None = None):
    """An illustrated story: one frame per column, its sentence under the picture."""
    sentences, images = list(sentences), list(images)
    if len(sentences) != len(images) or not images:
        raise ValueError(f"a story needs one sentence per picture; got {len(sentences)} and {len(images)}")
    lines = max(len(textwrap.wrap(sentence, width)) for sentence in sentences)
    fig, axes = plt.subplots(1, len(images), figsize=(size * len(images), size + 0.45 + 0.14 * lines),
                             squeeze=False, layout="constrained")
    for ax, sentence, image in zip(axes[0], sentences, images):
        ax.imshow(_as_array(image), interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_xlabel(textwrap.fill(sentence, width), fontsize=7.5)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def story_of(sample: Sample) -> tuple[list[str], list]:
    """The (sentences, pictures) of a story sample's assistant turn, each sentence with the picture after it."""
    sentences, pictures, pending = [], [], []
    for turn in sample.turns:
        if turn.role != "assistant":
            continue
        for seg in turn.content:
            if isinstance(seg, Text):
                pending.append(seg.text)
            else:
                sentences.append(" ".join(pending))
                pictures.append(seg)
                pending = []
    return sentences, pictures


def show_oracle(image, blobs, size: float = 2.6, title: str | None = None):
    """A picture with the oracle's reading drawn on it: a box and a label per object it found."""
    arr = _as_array(image)
    fig, ax = plt.subplots(figsize=(size, size), layout="constrained")
    ax.imshow(arr, interpolation="nearest")
    for blob in blobs:
        top, left, bottom, right = blob.bbox
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left + 1, bottom - top + 1, fill=False,
                               edgecolor="black", linewidth=0.8))
        o = blob.obj
        ax.text(left - 0.5, top - 0.8, f"{o.size} {o.color} {o.shape}", fontsize=6, va="bottom",
                bbox={"facecolor": "white", "alpha": 0.8, "pad": 0.5, "linewidth": 0})
    grid = arr.shape[0] / 3
    for k in (1, 2):
        ax.axhline(k * grid - 0.5, color="grey", linewidth=0.4, linestyle=":")
        ax.axvline(k * grid - 0.5, color="grey", linewidth=0.4, linestyle=":")
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
    return fig


# --- conversations as HTML -------------------------------------------------------------------------

def image_data_uri(image, scale: int = 3) -> str:
    """A PNG data URI of ``image`` (nearest-neighbour upscaled, so 32-pixel pictures stay crisp)."""
    pic = image.load() if isinstance(image, Image) else image
    pic = pic.convert("RGB")
    if scale > 1:
        pic = pic.resize((pic.width * scale, pic.height * scale), PILImage.NEAREST)
    buffer = io.BytesIO()
    pic.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_ROLE_STYLE = {"user": ("#e8f0fe", "flex-end"), "assistant": ("#f1f3f4", "flex-start"),
               "system": ("#fff8e1", "center")}


def sample_html(sample: Sample, scale: int = 3) -> str:
    """A conversation as chat bubbles, pictures embedded (self-contained HTML, no external files)."""
    rows = []
    for turn in sample.turns:
        color, align = _ROLE_STYLE[turn.role]
        parts = []
        for seg in turn.content:
            if isinstance(seg, Text):
                parts.append(f"<span>{html.escape(seg.text)}</span>")
            else:
                parts.append(f'<img src="{image_data_uri(seg, scale)}" style="image-rendering:pixelated;'
                             f'display:block;margin:4px 0;border-radius:4px">')
        rows.append(f'<div style="display:flex;justify-content:{align};margin:3px 0">'
                    f'<div style="background:{color};border-radius:10px;padding:6px 10px;max-width:70%;'
                    f'font-family:sans-serif;font-size:13px;color:#202124">'
                    f'<b style="font-size:11px;color:#5f6368">{turn.role}</b><br>{"".join(parts)}</div></div>')
    header = f'<div style="font-family:monospace;font-size:11px;color:#5f6368">{html.escape(sample.id)} · {sample.task}</div>'
    return f'<div style="max-width:560px">{header}{"".join(rows)}</div>'


def show_sample(sample: Sample, scale: int = 3):
    """Display a sample as a conversation in Jupyter (returns an ``IPython.display.HTML``)."""
    from IPython.display import HTML

    return HTML(sample_html(sample, scale))


# --- the pipeline ----------------------------------------------------------------------------------

_BOX_W, _BOX_H = 1.7, 0.72
_BOXES = {  # name: (x, y, label, notebook that builds it)
    "prompt": (0.0, 2.3, "text + images\n(chat template)", "03"),
    "vision": (0.0, 1.0, "vision encoder", "02"),
    "fusion": (2.2, 1.0, "projector +\nzero-init gate", "05"),
    "lm": (4.4, 2.3, "causal LM", "03"),
    "text": (6.7, 3.05, "text", ""),
    "adapter": (6.7, 1.0, "M³Adapter\nqueries · cross-attn · gate", "06"),
    "generator": (9.0, 1.0, "diffusion\ngenerator", "04"),
    "image": (9.0, 2.3, "image", ""),
}
_ARROWS = [  # (from box, side), (to box, side), label, curvature
    (("prompt", "right"), ("lm", "left"), "", 0.0),
    (("vision", "right"), ("fusion", "left"), "", 0.0),
    (("fusion", "top"), ("lm", "bottom"), "visual tokens", 0.0),
    (("lm", "right"), ("text", "left"), "", 0.0),
    (("lm", "right"), ("adapter", "left"), "[IMG] hidden states", 0.0),
    (("vision", "bottom"), ("adapter", "bottom"), "low-level features of the reference image", 0.18),
    (("adapter", "right"), ("generator", "left"), "prompt_embeds", 0.0),
    (("generator", "top"), ("image", "bottom"), "", 0.0),
    (("image", "top"), ("lm", "top"), "the picture goes back into the context", 0.3),
]


def _anchor(name: str, side: str) -> tuple[float, float]:
    x, y, *_ = _BOXES[name]
    return {"left": (x, y + _BOX_H / 2), "right": (x + _BOX_W, y + _BOX_H / 2),
            "top": (x + _BOX_W / 2, y + _BOX_H), "bottom": (x + _BOX_W / 2, y)}[side]


def pipeline_diagram(highlight=(), size: float = 9.5):
    """The M²Chat pipeline as boxes and arrows; ``highlight`` names boxes to colour (see ``_BOXES``)."""
    fig, ax = plt.subplots(figsize=(size, size * 0.42), layout="constrained")
    for name, (x, y, label, notebook) in _BOXES.items():
        face = "#ffd54f" if name in highlight else "#e3f2fd"
        ax.add_patch(FancyBboxPatch((x, y), _BOX_W, _BOX_H, boxstyle="round,pad=0.04", facecolor=face,
                                    edgecolor="#1565c0"))
        ax.text(x + _BOX_W / 2, y + _BOX_H / 2, label, ha="center", va="center", fontsize=7.5)
        if notebook:
            ax.text(x + _BOX_W - 0.05, y + _BOX_H - 0.05, notebook, ha="right", va="top", fontsize=6.5,
                    color="#1565c0", weight="bold")
    for (a, side_a), (b, side_b), label, rad in _ARROWS:
        start, end = _anchor(a, side_a), _anchor(b, side_b)
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=9, color="#37474f",
                                     connectionstyle=f"arc3,rad={rad}", linewidth=0.9, shrinkA=1, shrinkB=1))
        if label:
            mx, my = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2
            bend = rad * abs(end[0] - start[0]) / 2  # where the arc passes, above or below the chord
            ax.text(mx, my + (bend + 0.12 if rad and side_a == "top" else -bend - 0.25 if rad else 0.06), label,
                    ha="center", fontsize=6.3, color="#37474f", style="italic")
    ax.text(0.0, 4.45, "Blue numbers: the notebook that builds each part. M³FT stage 1 trains the adapter "
            "(07); stage 2 trains LoRA on the LM, the projector and the gate (08).", fontsize=6.8, color="#5f6368")
    ax.set_xlim(-0.2, 10.9), ax.set_ylim(-0.2, 4.7)
    ax.axis("off")
    return fig


def plot_gate_tradeoff(sweep: dict, size: tuple[float, float] = (10, 3.6)):
    """The creativity–consistency plot of notebook 10 from ``benchmarks/gate_sweep.json``: for stories
    (frames fully right against the character kept) and dialogue edits (edits done against untouched objects
    kept), the fixed gate from 0 to 1 as a line, the learned gate and the two-step baseline as markers."""
    fig, axes = plt.subplots(1, 2, figsize=size, layout="constrained")
    for ax, (x, y, title) in zip(axes, (("story_alignment_exact", "story_consistency", "stories"),
                                       ("edit_success", "edit_preservation", "dialogue edits"))):
        fixed = [r for r in sweep["rows"] if r["mode"] == "fixed" and r[x] is not None and r[y] is not None]
        ax.plot([r[x] for r in fixed], [r[y] for r in fixed], "o-", color="grey", label="fixed gate 0 → 1")
        for r in fixed:
            ax.annotate(f"{r['value']:g}", (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for r in sweep["rows"]:
            if r["mode"] != "fixed" and r[x] is not None and r[y] is not None:
                ax.plot(r[x], r[y], "*" if r["mode"] == "trained" else "s", markersize=11, label=r["gate"])
        ax.set_xlabel(x.replace("_", " ") + "  (creativity: follow the words)")
        ax.set_ylabel(y.replace("_", " ") + "  (consistency)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    return fig
