"""The layout planner: where the caption puts each object, read from the text encoder's token states.

Taught in notebook ``04_diffusion`` (its last section) and measured in ``benchmarks/DIFFUSION_RECIPE.md``
("The layout planner"). The generator's UNet reads the caption through its pooled embedding and through
cross-attention; on two-object captions it painted the right attributes in the wrong places (2% of pictures
fully right), because one pooled vector cannot say which object is where and cross-attention had not learnt
to at this budget. Yet the token states hold the whole scene: a small reader names every cell of the 3×3 grid
right on all two-object test captions. So the generator gets that reader as a first step, as LMD does with an
LLM (Lian et al. 2023, "LLM-grounded diffusion": text → layout → layout-conditioned diffusion) and as GLIGEN
feeds boxes to a UNet (Li et al. 2023):

1. :class:`LayoutPlanner`: nine learned queries, one per cell, read the caption's token states through a
   small transformer decoder (cross-attention to the words, self-attention between cells so two cells do not
   claim the same object) and name what each cell holds: empty or an object, and its shape, colour and size
   (one classifier per attribute, so colour–shape pairs never seen together still compose).
2. :meth:`LayoutPlanner.forward` turns those probabilities into a map, ``[B, channels, side, side]``: each
   place of the UNet's input grid gets its cell's probabilities. The UNet reads it as extra input channels
   (``diffusion.predict_noise``), so "draw a red circle *here*" is as direct as the noisy picture itself.

Before the cells read, two layers of self-attention re-read the caption (``reread_blocks``: 2 in the recipe, 0 by
default), so every word's state sees the words after it too: the text encoder is causal. Where the text encoder's
states say poorly where an object is, the planner then finds it in the position words; it triples the planner's
training time (``benchmarks/DIFFUSION_RECIPE.md``, "When the planner stalls").

The planner learns from the training pictures' layouts (the scenes that drew them; a real dataset would get
them from a detector, as GLIGEN's does) with a cross-entropy per cell (:func:`planner_loss`), before the UNet
trains, and stays frozen after. A caption dropped for classifier-free guidance (zero embeddings) gets an
empty map, so guidance contrasts "this caption, this layout" with "nothing".
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .world.scene import COLORS, GRID, MAX_OBJECTS, SHAPES, SIZES, Obj, Scene

# What the planner names in each cell, one classifier each: is there an object, and its attributes.
ATTRIBUTES = {"present": (False, True), "shape": SHAPES, "color": tuple(COLORS), "size": SIZES}
IGNORE = -100  # the attributes of an empty cell: no loss


def layout_channels() -> int:
    """Channels of a layout map: one for "an object is here", then one per shape, colour and size."""
    return 1 + sum(len(values) for name, values in ATTRIBUTES.items() if name != "present")


def cell_targets(scene: Scene) -> torch.Tensor:
    """``[9, 4]`` class indices (present, shape, colour, size) of each cell, row by row; an empty cell is
    ``(0, IGNORE, IGNORE, IGNORE)``."""
    targets = torch.full((GRID * GRID, len(ATTRIBUTES)), IGNORE, dtype=torch.long)
    targets[:, 0] = 0
    for o in scene:
        targets[o.row * GRID + o.col] = torch.tensor(
            [1] + [ATTRIBUTES[name].index(getattr(o, name)) for name in ("shape", "color", "size")])
    return targets


class LayoutPlanner(ModelMixin, ConfigMixin):
    """Caption token states ``[B, L, cond_dim]`` → what each of the 3×3 cells holds (see the module docstring).

    ``side`` is the UNet's input grid (16 for 32 px pictures in 2×2 patches); ``blocks`` decoder layers of
    ``width`` channels, after ``reread_blocks`` layers of self-attention over the words (0: none).
    :meth:`logits` gives the four classifiers' logits, :meth:`forward` the map the UNet reads, :meth:`read` the
    scenes it names.
    """

    @register_to_config
    def __init__(self, cond_dim: int = 128, side: int = 16, width: int = 128, heads: int = 4, blocks: int = 2,
                 reread_blocks: int = 0):
        super().__init__()
        if side < GRID:
            raise ValueError(f"side must be at least {GRID} (one place per cell), got {side}")
        if isinstance(reread_blocks, bool) or not isinstance(reread_blocks, int) or reread_blocks < 0:
            raise ValueError(f"reread_blocks must be a whole number of layers, 0 or more; got {reread_blocks!r}")
        self.queries = nn.Parameter(torch.randn(GRID * GRID, width) * 0.02)
        self.words = nn.Linear(cond_dim, width) if cond_dim != width else nn.Identity()
        block = dict(d_model=width, nhead=heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
                     batch_first=True, norm_first=True)  # pre-norm layers, for the re-read and the decoder alike
        # The text encoder is causal: a word's state holds only the words before it. `reread_blocks` layers
        # of self-attention over the caption let every word see the whole caption before the cells read it.
        self.reread = nn.TransformerEncoder(nn.TransformerEncoderLayer(**block), reread_blocks,
                                            norm=nn.LayerNorm(width), enable_nested_tensor=False) \
            if reread_blocks else nn.Identity()
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**block), blocks, norm=nn.LayerNorm(width))
        self.classifiers = nn.ModuleList(nn.Linear(width, len(values)) for values in ATTRIBUTES.values())

    @property
    def channels(self) -> int:
        return layout_channels()

    def logits(self, prompt_embeds: torch.Tensor) -> list[torch.Tensor]:
        """One ``[B, 9, classes]`` tensor per attribute of :data:`ATTRIBUTES`."""
        words = self.reread(self.words(prompt_embeds))
        cells = self.decoder(self.queries.expand(len(prompt_embeds), -1, -1), words)
        return [classify(cells) for classify in self.classifiers]

    def forward(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """The layout map ``[B, channels, side, side]``: at every place, its cell's probability of holding an
        object, then of each shape, colour and size (each times the first). Zero for a dropped caption."""
        present, *attributes = self.logits(prompt_embeds)
        here = present.softmax(-1)[..., 1:]  # [B, 9, 1]
        cells = torch.cat([here] + [a.softmax(-1) * here for a in attributes], dim=-1)
        b = len(prompt_embeds)
        grid = cells.transpose(1, 2).reshape(b, -1, GRID, GRID)
        kept = (prompt_embeds.flatten(1).abs().sum(-1) > 0).to(grid.dtype)  # zero embeddings: no caption
        return F.interpolate(grid, size=self.config.side, mode="nearest") * kept[:, None, None, None]

    @torch.no_grad()
    def read(self, prompt_embeds: torch.Tensor) -> list[Scene]:
        """The scene each caption describes, as the planner names it: its most likely class per cell (at most
        ``MAX_OBJECTS`` objects, the surest ones, as a scene holds no more)."""
        logits = self.logits(prompt_embeds)
        chosen = torch.stack([x.argmax(-1) for x in logits], dim=-1)  # [B, 9, 4]
        sureness = logits[0].softmax(-1)[..., 1]  # [B, 9]: how sure each cell holds an object
        scenes = []
        for cells, sure in zip(chosen.tolist(), sureness.tolist()):
            full = sorted((i for i in range(len(cells)) if cells[i][0]), key=lambda i: -sure[i])[:MAX_OBJECTS]
            objects = [Obj(i // GRID, i % GRID, *(ATTRIBUTES[name][k] for name, k in
                                                  zip(("shape", "color", "size"), cells[i][1:]))) for i in full]
            scenes.append(Scene(tuple(objects)))
        return scenes


def planner_loss(planner: LayoutPlanner, prompt_embeds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The sum over attributes of the cross-entropy of every cell (``targets`` from :func:`cell_targets`,
    stacked to ``[B, 9, 4]``); an empty cell counts only for "present"."""
    return sum(F.cross_entropy(x.flatten(0, 1).float(), targets[..., i].flatten(), ignore_index=IGNORE)
               for i, x in enumerate(planner.logits(prompt_embeds)))


def planner_accuracy(planner: LayoutPlanner, prompt_embeds: torch.Tensor, scenes: Sequence[Scene]) -> dict:
    """``{"1 object": share, "2 objects": ..., "3 objects": ..., "all": ...}`` of captions whose nine cells the
    planner names all right."""
    right = [read == scene for read, scene in zip(planner.read(prompt_embeds), scenes)]
    groups = {f"{n} object{'s' * (n > 1)}": [r for r, s in zip(right, scenes) if len(s) == n] for n in (1, 2, 3)}
    table = {name: sum(rows) / len(rows) for name, rows in groups.items() if rows}
    table["all"] = sum(right) / len(right)
    return table


def train_planner(config, text_encoder, tokenizer, train_config, patch_size: int = 2, batch_size: int = 256,
                  pool_size: int = 40_000, device: str = "cpu", out_dir=None, progress: bool = True,
                  **planner_kwargs):
    """Train a :class:`LayoutPlanner` for the UNet of ``config`` (input grid ``image_size / patch_size``) with
    the shared loop; returns ``(planner, result)``, the planner frozen.

    The data: ``pool_size`` training-split caption pairs of 1–3 objects, encoded once by the frozen
    ``text_encoder`` (the planner's step is cheaper than encoding its batch), and batches drawn from them by a
    generator seeded by the step (so a resumed run sees the same batches)."""
    from .benchmark import training_seed
    from .diffusion import encode_prompts  # the generator's own text conditioning
    from .training import train
    from .world import caption_pairs

    torch.manual_seed(train_config.seed)
    planner = LayoutPlanner(cond_dim=config.cond_dim, side=config.image_size // patch_size, **planner_kwargs)
    planner.to(device)
    pairs = caption_pairs(pool_size, seed=training_seed(0, 1_000 + train_config.seed), split="train")
    embeds = torch.cat([encode_prompts(text_encoder, tokenizer, [p.caption for p in pairs[i:i + 1000]],
                                       device=device)[0] for i in range(0, pool_size, 1000)])
    targets = torch.stack([cell_targets(p.scene) for p in pairs]).to(device)

    def make_batch(step: int):
        rows = torch.randint(0, pool_size, (batch_size,), generator=torch.Generator().manual_seed(step))
        return embeds[rows], targets[rows]

    result = train(planner, lambda batch: planner_loss(planner, *batch), make_batch, train_config,
                   out_dir=out_dir, device=device, progress=progress, description="layout planner")
    return planner.eval().requires_grad_(False), result
