"""Benchmark: what a tiny CLIP can tell apart, in its text embeddings and in its vision features.

    python benchmarks/clip_probe.py --clip data/checkpoints/tiny/clip
    python benchmarks/clip_probe.py --clip data/checkpoints/tiny/clip --fusion data/checkpoints/tiny/fusion --json OUT

Everything downstream inherits what the CLIP keeps: the generator (notebook 04) draws from its text
encoder's states, the fused LM (notebook 05) reads its vision features. Three measurements:

1. **Text.** The cosine similarity of the pooled text embedding of a caption with the same caption with one
   attribute changed (another cell, colour, size or shape). Near 1 means the encoder can barely say which:
   the first tiny CLIP put "top left" and "top right" at 0.996, and its generator could not place objects.
2. **Vision.** Probes trained to read an object's shape, colour and size from the feature of its cell (the
   8×8 patch grid averaged to the 3×3 grid of ShapeWorld, as the fusion projector pools it) at the patch
   embeddings (layer 0) and the last layer, on freshly drawn scenes of 1–3 objects: a linear probe (is it
   plainly there?) and a one-hidden-layer MLP (is it there at all?). One probe serves all nine cells, as one
   projector does; a probe per cell reads more (``M2CHAT_RECIPE.md``: 99% of shapes linearly at layer 0),
   because each cell then has its own readout. With ``--fusion``, the same probes on the visual tokens the
   trained projector hands the LM.
3. **Binding.** Two-object scenes with one attribute swapped between the objects ("a red circle … and a
   blue square …" against "a blue circle … and a red square …"): how often the picture scores its own
   caption above the swapped one, and the cosine of the two captions' pooled embeddings. A bag-of-words
   encoder cannot tell them apart (50%, cosine 1); the generator can only draw two objects right if it can.
4. **Scene readout.** Can the whole scene be read back from the text encoder's output, and from which part of
   it? A readout is trained on ``--readout-captions`` training captions to name what each of the nine cells
   holds (empty, or the shape, colour and size of its object), once from the token sequence (nine learned
   queries, one attention layer over the states: what a generator's cross-attention can do) and once from the
   pooled embedding alone (an MLP: what a generator conditioned on it alone can do). Scored as the share of
   fresh test captions whose nine cells are all read right, by object count. For the shipped CLIP the
   pooled vector holds one object but not two: a generator that leans on it draws the attributes without
   knowing which object has which (``DIFFUSION_RECIPE.md``).

Probes are trained full-batch with Adam on ``--train`` scenes and scored on ``--test`` others; chance is 33%
for shape, 17% for colour, 50% for size. About 30 s on one thread, and about 2 minutes for the scene readouts.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from m2chat_lite.data import image_to_tensor
from dataclasses import replace

from m2chat_lite.encoders import encode_text, load_clip, similarity
from m2chat_lite.fusion import pool_patches
from m2chat_lite.utils import atomic_write_json
from m2chat_lite.world import caption_pairs
from m2chat_lite.world.captions import caption
from m2chat_lite.world.scene import COLORS, GRID, SHAPES, SIZES, Scene, random_scene, render

ATTRIBUTES = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES}
BASE_CAPTION = "a large red circle at the top left"
CHANGED = {"cell (top right)": "a large red circle at the top right",
           "cell (bottom right)": "a large red circle at the bottom right",
           "colour (blue)": "a large blue circle at the top left",
           "size (small)": "a small red circle at the top left",
           "shape (square)": "a large red square at the top left",
           "shape (triangle)": "a large red triangle at the top left"}


@torch.no_grad()
def text_similarities(clip, tokenizer) -> dict[str, float]:
    """Cosine of BASE_CAPTION's pooled embedding with each one-attribute change of it."""
    _, pooled = encode_text(clip, tokenizer, [BASE_CAPTION, *CHANGED.values()])
    pooled = F.normalize(pooled.float(), dim=-1)
    return {name: round(float(pooled[0] @ pooled[i + 1]), 3) for i, name in enumerate(CHANGED)}


def swapped(scene: Scene, attribute: str) -> Scene | None:
    """``scene`` (two objects) with ``attribute`` exchanged between its objects; None if they share it."""
    a, b = scene
    if getattr(a, attribute) == getattr(b, attribute):
        return None
    return Scene((replace(a, **{attribute: getattr(b, attribute)}), replace(b, **{attribute: getattr(a, attribute)})))


@torch.no_grad()
def binding(clip, tokenizer, scenes: list[Scene], size: int) -> dict[str, dict[str, float]]:
    """``{attribute: {"picture picks its caption": rate, "pooled cosine": mean, "n": pairs}}`` over the
    two-object ``scenes`` whose objects differ in that attribute (canonical captions)."""
    table = {}
    for attribute in ATTRIBUTES:
        pairs = [(s, t) for s in scenes if len(s) == 2 and (t := swapped(s, attribute)) is not None]
        if not pairs:
            continue
        own, other = [caption(s) for s, _ in pairs], [caption(t) for _, t in pairs]
        sims = similarity(clip, tokenizer, pictures([s for s, _ in pairs], size), own + other)
        n = len(pairs)
        picks = sims[torch.arange(n), torch.arange(n)] > sims[torch.arange(n), torch.arange(n) + n]
        _, pooled = encode_text(clip, tokenizer, own + other)
        pooled = F.normalize(pooled.float(), dim=-1)
        table[attribute] = {"picture picks its caption": round(float(picks.float().mean()), 3),
                            "pooled cosine": round(float((pooled[:n] * pooled[n:]).sum(-1).mean()), 3), "n": n}
    return table


CELLS = GRID * GRID
OBJECT_CLASSES = [(shape, color, size) for shape in SHAPES for color in COLORS for size in SIZES]


def cell_labels(scene: Scene) -> torch.Tensor:
    """``[9]``: 0 for an empty cell, else 1 + the index of its object's (shape, colour, size)."""
    labels = torch.zeros(CELLS, dtype=torch.long)
    for o in scene:
        labels[o.row * GRID + o.col] = 1 + OBJECT_CLASSES.index((o.shape, o.color, o.size))
    return labels


class SceneReadout(nn.Module):
    """Names what each cell holds, from the token sequence (nine queries, one attention layer) or from the
    pooled embedding alone (an MLP); the same classifier head on both."""

    def __init__(self, source: str, cond_dim: int, pooled_dim: int, width: int = 128, heads: int = 4):
        super().__init__()
        if source not in ("sequence", "pooled"):
            raise ValueError(f"source must be 'sequence' or 'pooled', got {source!r}")
        self.source = source
        self.queries = nn.Parameter(torch.randn(CELLS, width) * 0.02)
        self.attention = nn.MultiheadAttention(width, heads, kdim=cond_dim, vdim=cond_dim, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(pooled_dim, 2 * width), nn.GELU(), nn.Linear(2 * width, CELLS * width))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(),
                                  nn.Linear(width, 1 + len(OBJECT_CLASSES)))

    def forward(self, sequence: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        if self.source == "sequence":
            cells = self.attention(self.queries.expand(len(sequence), -1, -1), sequence, sequence)[0]
        else:
            cells = self.mlp(pooled).view(len(pooled), CELLS, -1)
        return self.head(cells)  # [B, 9, classes]


@torch.no_grad()
def encoded_captions(clip, tokenizer, n: int, seed: int, split: str):
    """``(sequence, pooled, cell labels, object counts)`` for ``n`` caption pairs of 1–3 objects."""
    pairs = caption_pairs(n, seed=seed, split=split)
    chunks = [encode_text(clip, tokenizer, [p.caption for p in pairs[i:i + 500]]) for i in range(0, n, 500)]
    return (torch.cat([c[0] for c in chunks]).float(), torch.cat([c[1] for c in chunks]).float(),
            torch.stack([cell_labels(p.scene) for p in pairs]), torch.tensor([len(p.scene) for p in pairs]))


def scene_readout(clip, tokenizer, n_train: int, n_test: int, steps: int, batch_size: int = 256,
                  seed: int = 0) -> dict[str, dict[str, float]]:
    """``{"sequence"|"pooled": {"1 object": share, "2 objects": ..., "3 objects": ...}}``: test captions whose
    nine cells the readout names all right (fresh captions, drawn like the training ones from another seed)."""
    train, test = encoded_captions(clip, tokenizer, n_train, seed, "train"), \
        encoded_captions(clip, tokenizer, n_test, seed + 1, "train")
    table = {}
    for source in ("sequence", "pooled"):
        torch.manual_seed(seed)
        readout = SceneReadout(source, train[0].shape[-1], train[1].shape[-1])
        optimizer = torch.optim.AdamW(readout.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            rows = torch.randint(0, n_train, (batch_size,), generator=g)
            logits = readout(train[0][rows], train[1][rows])
            optimizer.zero_grad()
            F.cross_entropy(logits.flatten(0, 1), train[2][rows].flatten()).backward()
            optimizer.step()
        with torch.no_grad():
            right = (readout(test[0], test[1]).argmax(-1) == test[2]).all(-1)
        table[source] = {f"{k} object{'s' * (k > 1)}": round(float(right[test[3] == k].float().mean()), 3)
                         for k in (1, 2, 3) if (test[3] == k).any()}
    return table


def random_scenes(n: int, seed: int) -> list[Scene]:
    """``n`` scenes of 1–3 objects with every attribute drawn uniformly (held-out pairs included)."""
    rng = random.Random(seed)
    return [random_scene(rng, split="any") for _ in range(n)]


def object_rows(scenes: list[Scene], cells: torch.Tensor, attribute: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per object: the feature of its cell and the index of its ``attribute``."""
    values = ATTRIBUTES[attribute]
    rows = [(cells[i, o.row * GRID + o.col], values.index(getattr(o, attribute)))
            for i, scene in enumerate(scenes) for o in scene]
    return torch.stack([x for x, _ in rows]), torch.tensor([y for _, y in rows])


def probe_accuracy(train: tuple, test: tuple, classes: int, hidden: int | None, steps: int = 400,
                   seed: int = 0) -> float:
    """Fit a linear (``hidden=None``) or one-hidden-layer probe on standardised ``train`` rows, score ``test``."""
    (x, y), (x_test, y_test) = train, test
    mean, std = x.mean(0), x.std(0) + 1e-6
    torch.manual_seed(seed)
    probe = nn.Linear(x.shape[1], classes) if hidden is None else \
        nn.Sequential(nn.Linear(x.shape[1], hidden), nn.GELU(), nn.Linear(hidden, classes))
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(probe((x - mean) / std), y).backward()
        optimizer.step()
    with torch.no_grad():
        return float((probe((x_test - mean) / std).argmax(-1) == y_test).float().mean())


def probe_table(train_scenes, train_cells, test_scenes, test_cells, steps: int = 400) -> dict[str, dict[str, float]]:
    """``{attribute: {"linear": acc, "mlp": acc}}`` for the scenes' cell features ``[N, 9, d]``."""
    table = {}
    for attribute, values in ATTRIBUTES.items():
        train = object_rows(train_scenes, train_cells, attribute)
        test = object_rows(test_scenes, test_cells, attribute)
        table[attribute] = {"linear": probe_accuracy(train, test, len(values), None, steps),
                            "mlp": probe_accuracy(train, test, len(values), 256, steps)}
    return table


def pictures(scenes: list[Scene], size: int) -> torch.Tensor:
    return torch.stack([image_to_tensor(render(s, size)) for s in scenes])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", type=Path, default=Path("data/checkpoints/tiny/clip"))
    parser.add_argument("--fusion", type=Path, default=None, help="also probe this fused model's visual tokens")
    parser.add_argument("--train", type=int, default=3000, help="scenes to fit the probes on")
    parser.add_argument("--test", type=int, default=600, help="other scenes to score them on")
    parser.add_argument("--steps", type=int, default=400, help="probe optimizer steps (full batch)")
    parser.add_argument("--readout-captions", type=int, default=20_000, help="captions to fit the scene readouts on")
    parser.add_argument("--readout-steps", type=int, default=1500, help="scene readout optimizer steps (batch 256)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clip, tokenizer = load_clip(args.clip)
    clip.eval()
    size = clip.config.vision_config.image_size
    train_scenes, test_scenes = random_scenes(args.train, seed=0), random_scenes(args.test, seed=1)

    text_key = f"text cosine to '{BASE_CAPTION}'"
    results: dict = {"clip": str(args.clip), text_key: text_similarities(clip, tokenizer)}
    rng = random.Random(2)
    two_objects = [random_scene(rng, 2, split="any") for _ in range(args.test)]
    results["binding (two objects, one attribute swapped)"] = binding(clip, tokenizer, two_objects, size)
    readout_key = "scene readout (test captions with all nine cells right)"
    results[readout_key] = scene_readout(clip, tokenizer, args.readout_captions, args.test, args.readout_steps)
    @torch.no_grad()
    def hidden_states(scenes):  # the vision encoder once per scene set, every layer kept
        return clip.vision_model(pixel_values=pictures(scenes, size), output_hidden_states=True).hidden_states
    train_states, test_states = hidden_states(train_scenes), hidden_states(test_scenes)
    for layer in (0, -1):
        results[f"vision layer {layer}"] = probe_table(train_scenes, pool_patches(train_states[layer], GRID),
                                                       test_scenes, pool_patches(test_states[layer], GRID), args.steps)
    if args.fusion is not None:
        from m2chat_lite.fusion import load_fused

        fused, _ = load_fused(args.fusion)

        @torch.no_grad()
        def visual_tokens(scenes):
            return fused.visual_tokens(pictures(scenes, size)) * torch.tanh(fused.gate)
        results["fusion visual tokens"] = probe_table(train_scenes, visual_tokens(train_scenes), test_scenes,
                                                      visual_tokens(test_scenes), args.steps)

    print(f"text: cosine of the pooled embedding of '{BASE_CAPTION}' with one attribute changed")
    for name, value in results[text_key].items():
        print(f"  {name:<20} {value:6.3f}")
    print(f"\nbinding: {args.test} two-object scenes, one attribute swapped between the objects")
    for attribute, row in results["binding (two objects, one attribute swapped)"].items():
        print(f"  {attribute:<8} picture picks its own caption {row['picture picks its caption']:6.1%}, "
              f"pooled cosine of the two captions {row['pooled cosine']:.3f} ({row['n']} pairs)")
    print(f"\nscene readout: {args.test} test captions whose nine cells are all named right, trained on "
          f"{args.readout_captions} captions")
    for source, row in results[readout_key].items():
        print(f"  from the {source:<9}" + "".join(f"{group:>12} {value:6.1%}" for group, value in row.items()))
    print(f"\nprobes: an object's attribute read from the feature of its cell ({args.test} test scenes)")
    print(f"  {'features':<22}" + "".join(f"{a + ' ' + k:>14}" for a in ATTRIBUTES for k in ("linear", "mlp")))
    for name, table in results.items():
        if isinstance(table, dict) and "linear" in table.get("shape", {}):
            print(f"  {name:<22}" + "".join(f"{table[a][k]:>14.1%}" for a in ATTRIBUTES for k in ("linear", "mlp")))
    if args.json is not None:
        atomic_write_json(args.json, {**results, "command": " ".join(["python", *sys.argv])})
    return results


if __name__ == "__main__":
    main()
