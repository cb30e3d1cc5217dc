"""Multimodal prompt fusion: pictures go into the LM's input through a projector and a zero-initialised gate.

Taught in notebook ``05_multimodal_prompt_fusion``. The LM of notebook 03 reads token ids; here it learns
to read pictures too, without being rebuilt:

1. the frozen **vision encoder** (notebook 02) turns a picture into patch features ``[1 + P, d]``; we take
   two of its layers side by side (``FEATURE_LAYERS``): the patch embeddings, where shape is still
   plain to see, and the last layer (the tiny CLIP's training kept colour and place there but lost most
   of shape: a linear probe reads an object's shape from 99% of cells at layer 0, 70% at the last);
2. they are average-pooled to a ``g × g`` grid of ``V = g²`` features (``V = 1`` takes the class token),
   and a small MLP, the **projector**, maps each to the LM's width: ``V`` visual tokens;
3. each ``<image>`` placeholder in the prompt stands for one picture; ``expand_image_tokens`` repeats it
   ``V`` times (one slot per visual token) and the embedding at each slot becomes

       embed(<image>) + tanh(gate) · visual_token

   with ``gate`` a single learned number that **starts at 0**. At step 0 the fused model is therefore
   exactly the LM reading ``<image>`` placeholders (tested); training opens the gate as far as the
   pictures help (LLaMA-Adapter's zero-init gating, applied to the input, LLaVA-style).

Everything goes through ``inputs_embeds``, which every ``transformers`` causal LM accepts, so the same
class wraps the tiny Llama and a pretrained SmolLM2, with or without ``peft`` LoRA adapters.

The class also holds the ``[IMG0..K-1]`` **input embeddings** as their own parameter (a copy of the LM's
rows, so nothing changes at first): M³FT stage 1 (notebook 07) trains them, and only them, of the LM side.

Training here (``train_fusion``) is visual-question answering on ShapeWorld: the projector, the gate and
LoRA on the LM learn; the vision encoder and the LM's own weights stay frozen. The loss is on the
assistant's answer only. ``vqa_accuracy`` scores exact answers with greedy decoding.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .benchmark import training_seed
from .data import Sample, image_to_tensor, load_image
from .tokenizer import END_TOKEN, IGNORE_INDEX, IMAGE_TOKEN, encode_chat, image_gen_tokens, num_image_tokens
from .training import TrainConfig, TrainResult, train
from .utils import DATA_DIR
from .world.samples import make_samples, scenes_of

LORA_TARGETS = "all-linear"  # peft: every linear layer of the LM except its output head
# Which hidden states of the vision encoder the projector reads, concatenated: 0 is the patch embeddings
# (low level: edges and colours, where shape is still plain), -1 the last layer (what CLIP training kept).
FEATURE_LAYERS = (0, -1)


# ---------------------------------------------------------------------------------------------
# The projector
# ---------------------------------------------------------------------------------------------


def pool_patches(features: torch.Tensor, grid: int) -> torch.Tensor:
    """Vision features ``[B, 1 + P, d]`` (class token first, then a square grid of ``P`` patches) -> the
    patch grid average-pooled to ``grid × grid`` cells, row by row: ``[B, grid², d]``."""
    patches = features[:, 1:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"expected a square grid of patch features after the class token, got "
                         f"{patches.shape[1]} patches")
    cells = patches.transpose(1, 2).reshape(len(features), -1, side, side)  # [B, d, side, side]
    return F.adaptive_avg_pool2d(cells, grid).flatten(2).transpose(1, 2)


class VisualProjector(nn.Module):
    """Vision features ``[B, 1 + P, d_vision]`` (class token first, then a square grid of ``P`` patches)
    to ``V`` visual tokens ``[B, V, d_lm]``: pool the patch grid to ``g × g`` (or take the class token
    when ``V = 1``), then a two-layer MLP (LLaVA-1.5's projector).

    With ``pool_last`` the MLP runs on every patch first and its outputs are pooled: the average of
    non-linear patch features keeps what an average of the raw features blurs (an object's shape)."""

    def __init__(self, vision_dim: int, lm_dim: int, tokens_per_image: int = 9, pool_last: bool = False):
        super().__init__()
        self.pool_last = pool_last
        grid = math.isqrt(tokens_per_image)
        if tokens_per_image < 1 or (tokens_per_image > 1 and grid * grid != tokens_per_image):
            raise ValueError(f"tokens_per_image must be 1 (the class token) or a square number (a pooled grid), "
                             f"got {tokens_per_image}")
        self.tokens_per_image, self.grid = tokens_per_image, grid
        self.mlp = nn.Sequential(nn.LayerNorm(vision_dim), nn.Linear(vision_dim, lm_dim), nn.GELU(),
                                 nn.Linear(lm_dim, lm_dim))
        # Which cell of the grid a token describes, as a learned vector: the LM sees V slots in a row and
        # could otherwise only tell them apart by their distance from the question (its rotary positions).
        self.slot_embeddings = nn.Parameter(torch.zeros(tokens_per_image, lm_dim))

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + P, d]`` -> ``[B, V, d]``: the class token, or the patch grid averaged to ``g × g`` cells."""
        if self.tokens_per_image == 1:
            return features[:, :1]
        return pool_patches(features, self.grid)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.pool_last:
            return self.pool(self.mlp(features)) + self.slot_embeddings
        return self.mlp(self.pool(features)) + self.slot_embeddings


# ---------------------------------------------------------------------------------------------
# Placeholders: one <image> per picture in the text, V slots per picture in the model
# ---------------------------------------------------------------------------------------------


def expand_image_tokens(input_ids: Sequence[int], labels: Sequence[int] | None, image_id: int,
                        tokens_per_image: int) -> tuple[list[int], list[int] | None]:
    """Repeat every ``<image>`` id ``tokens_per_image`` times (labels ``-100`` on the copies).

    ``encode_chat`` writes one ``<image>`` per picture; the fused model needs one slot per visual token."""
    ids, out_labels = [], [] if labels is not None else None
    for i, token in enumerate(input_ids):
        copies = tokens_per_image if token == image_id else 1
        ids += [token] * copies
        if out_labels is not None:
            out_labels += [labels[i]] + [IGNORE_INDEX] * (copies - 1)
    return ids, out_labels


# ---------------------------------------------------------------------------------------------
# The fused model
# ---------------------------------------------------------------------------------------------


class FusedLM(nn.Module):
    """A causal LM that reads pictures: ``lm`` (any ``transformers`` causal LM, or a ``peft`` model around
    one), a frozen ``vision_model`` (``clip.vision_model`` or any module returning ``last_hidden_state``),
    a :class:`VisualProjector` and the fusion ``gate`` (``tanh(gate)`` scales the visual tokens; 0 at first).

    ``forward(input_ids, pixel_values, ...)`` takes ids with ``V`` ``<image>`` slots per picture (see
    ``expand_image_tokens``) and the pictures in the order their slots appear (row by row), and returns
    the LM's output (``loss`` when ``labels`` are given, ``logits``, ``hidden_states`` on request).
    """

    def __init__(self, lm, vision_model, projector: VisualProjector, tokenizer,
                 feature_layers: Sequence[int] = FEATURE_LAYERS):
        super().__init__()
        self.lm, self.vision_model, self.projector = lm, vision_model, projector
        self.feature_layers = tuple(feature_layers)
        self.gate = nn.Parameter(torch.zeros(()))
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        k = num_image_tokens(tokenizer)
        if k == 0 or self.image_token_id in (None, tokenizer.unk_token_id):
            raise ValueError("the tokenizer has no <image>/[IMGk] tokens; call add_m2chat_tokens(tokenizer, K) "
                             "and resize the LM's embeddings first")
        self.register_buffer("gen_token_ids", torch.tensor(tokenizer.convert_tokens_to_ids(image_gen_tokens(k))),
                             persistent=False)
        rows = self.lm.get_input_embeddings().weight[self.gen_token_ids]
        self.gen_embeddings = nn.Parameter(rows.detach().clone().float())  # [K, d]: trained in M³FT stage 1
        self.vision_model.requires_grad_(False)

    @property
    def tokens_per_image(self) -> int:
        return self.projector.tokens_per_image

    @property
    def device(self) -> torch.device:
        return self.gate.device

    def gate_value(self) -> float:
        """``tanh(gate)``: how much of the visual tokens reaches the LM (0 = none)."""
        return float(torch.tanh(self.gate.detach()))

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pictures in [-1, 1] ``[N, 3, H, W]`` -> the vision encoder's hidden states at ``feature_layers``,
        concatenated along channels: ``[N, 1 + P, d_vision · len(feature_layers)]``."""
        train_vision = any(p.requires_grad for p in self.vision_model.parameters())
        with torch.set_grad_enabled(train_vision and torch.is_grad_enabled()):
            out = self.vision_model(pixel_values=pixel_values.to(self.device), output_hidden_states=True)
        return torch.cat([out.hidden_states[layer] for layer in self.feature_layers], -1).float()

    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pictures in [-1, 1] ``[N, 3, H, W]`` -> ``[N, V, d_lm]`` (the vision encoder stays frozen)."""
        return self.projector(self.vision_features(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """``inputs_embeds`` for ``input_ids``: token embeddings, the ``[IMGk]`` rows from ``gen_embeddings``,
        and ``embed(<image>) + tanh(gate) · visual token`` at the ``<image>`` slots."""
        embeddings = self.lm.get_input_embeddings()(input_ids)
        is_gen = input_ids.unsqueeze(-1) == self.gen_token_ids  # [B, L, K]
        if is_gen.any():
            gen = is_gen.to(self.gen_embeddings.dtype) @ self.gen_embeddings  # the K rows where they occur
            embeddings = torch.where(is_gen.any(-1, keepdim=True), gen.to(embeddings.dtype), embeddings)
        slots = input_ids == self.image_token_id
        n_slots, n_pictures = int(slots.sum()), 0 if pixel_values is None else len(pixel_values)
        if n_slots != n_pictures * self.tokens_per_image:
            raise ValueError(f"the ids hold {n_slots} <image> slots but {n_pictures} pictures were given, which "
                             f"need {n_pictures * self.tokens_per_image} ({self.tokens_per_image} per picture); "
                             "expand each <image> with expand_image_tokens and pass one picture per <image>")
        if n_pictures:
            visual = self.visual_tokens(pixel_values).reshape(-1, embeddings.shape[-1])
            scaled = (torch.tanh(self.gate) * visual).to(embeddings.dtype)
            embeddings = embeddings.masked_scatter(slots.unsqueeze(-1), embeddings[slots] + scaled)
        return embeddings

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, **lm_kwargs):
        return self.lm(inputs_embeds=self.embed(input_ids, pixel_values), **lm_kwargs)

    def hidden_states(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      layers: Sequence[int] = (-1,), normalize: bool = False) -> torch.Tensor:
        """The LM's hidden states at ``layers``, concatenated along channels: ``[B, L, d · len(layers)]``.
        Layer 0 is the input embeddings (words and visual tokens as the LM receives them), -1 the last
        layer after the LM's final norm, ``i`` the output of decoder layer ``i``.

        ``normalize`` layer-norms each layer's states (no learnt scale) before they are put side by side.
        The layers live at very different scales (the tiny LM's input embeddings are about 12 times smaller
        than its last layer), and a reader given them raw all but ignores the small one: with the same
        800-step budget, stage 1's adapter drew 7.0% of test captions fully right raw and 25.7% normalised
        (``benchmarks/DIFFUSION_RECIPE.md``).

        One function for training and for generation, so both condition on the same states (the official
        code trained on normed states and generated from un-normed ones)."""
        body = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        embeds = self.embed(input_ids, pixel_values)
        middle = any(layer not in (0, -1) for layer in layers)
        out = body.base_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False, output_hidden_states=middle)
        picked = [embeds if layer == 0 else out.last_hidden_state if layer == -1 else out.hidden_states[layer]
                  for layer in layers]
        if normalize:
            picked = [F.layer_norm(states.float(), states.shape[-1:]) for states in picked]
        return torch.cat(picked, -1).float()


@contextlib.contextmanager
def _quiet_peft():
    """peft 0.21 asks transformers 5 for ``is_gradient_checkpointing``, which warns that it is deprecated;
    the warning is about the two libraries, not about anything a user can change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@contextlib.contextmanager
def lora_merged(model: FusedLM):
    """Inside the block the LoRA is folded into the LM's own weights (``W + s·B·A``, peft's
    ``merge_adapter``), so each adapted layer is one matrix product instead of three. M³FT stage 1 trains with
    the LoRA frozen and runs its LM about a quarter faster this way (notebook 07). On leaving, the LM's own
    weights are put back exactly as they were (copied back, not subtracted, which would round)."""
    if not hasattr(model.lm, "merge_adapter"):  # no LoRA: nothing to fold
        yield
        return
    lora = [name for name, param in model.lm.named_parameters() if "lora_" in name and param.requires_grad]
    if lora:
        raise ValueError(f"the LoRA is training ({lora[0]} has requires_grad=True); fold it into the LM only "
                         "while it is frozen, as in M³FT stage 1")
    own = {name: param.detach().clone() for name, param in model.lm.named_parameters() if ".base_layer." in name}
    with _quiet_peft():
        model.lm.merge_adapter()
    try:
        yield
    finally:
        with _quiet_peft():
            model.lm.unmerge_adapter()
        params = dict(model.lm.named_parameters())
        with torch.no_grad():
            for name, value in own.items():
                params[name].copy_(value)


@contextlib.contextmanager
def gate_closed(model: FusedLM):
    """Inside the block the fusion gate is 0 (the LM reads no pictures); afterwards it is as it was."""
    opened = model.gate.detach().clone()
    with torch.no_grad():
        model.gate.zero_()
    try:
        yield model
    finally:
        with torch.no_grad():
            model.gate.copy_(opened)


def build_fused_lm(lm, clip, tokenizer, tokens_per_image: int = 9, lora_rank: int | None = 16,
                   seed: int = 0, feature_layers: Sequence[int] = FEATURE_LAYERS,
                   pool_last: bool = False) -> FusedLM:
    """Wrap ``lm`` and ``clip``'s vision tower (or a vision model itself, such as ``hf.VisionTower``) into a
    :class:`FusedLM` with a fresh projector; with ``lora_rank``, LoRA adapters (``peft``, every linear layer)
    are added to the LM and its own weights frozen. The projector's initial weights come from ``seed``."""
    vision = getattr(clip, "vision_model", clip)
    if lora_rank is not None:
        from peft import LoraConfig, get_peft_model

        with _quiet_peft():
            lm = get_peft_model(lm, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                               target_modules=LORA_TARGETS))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        projector = VisualProjector(vision.config.hidden_size * len(feature_layers), lm.config.hidden_size,
                                    tokens_per_image, pool_last=pool_last)
    return FusedLM(lm, vision, projector, tokenizer, feature_layers).to(lm.device)


def set_trainable(model: FusedLM, groups: Sequence[str]) -> list[str]:
    """Freeze everything, then unfreeze ``groups`` (any of ``projector``, ``gate``, ``lora``,
    ``gen_embeddings``). Returns the names of the trainable parameters."""
    known = {"projector", "gate", "lora", "gen_embeddings"}
    unknown = set(groups) - known
    if unknown:
        raise ValueError(f"unknown parameter groups {sorted(unknown)}; choose from {sorted(known)}")
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        group = ("lora" if "lora_" in name else name.split(".")[0])
        if group in groups:
            param.requires_grad_(True)
    return [name for name, param in model.named_parameters() if param.requires_grad]


# ---------------------------------------------------------------------------------------------
# Batches of conversations with pictures
# ---------------------------------------------------------------------------------------------


def encode_with_pictures(tokenizer, sample: Sample, tokens_per_image: int, image_size: int,
                         add_generation_prompt: bool = False) -> dict:
    """One sample's ``input_ids`` and ``labels`` (the assistant's tokens) with expanded ``<image>`` slots,
    and its pictures ``[n, 3, H, W]`` in [-1, 1], in order."""
    messages, pictures = sample.to_messages()
    encoded = encode_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    ids, labels = expand_image_tokens(encoded["input_ids"], encoded["labels"],
                                      tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokens_per_image)
    pixels = [image_to_tensor(load_image(p, size=image_size)) for p in pictures]  # RGB, square, image_size
    return {"input_ids": ids, "labels": labels,
            "pixel_values": torch.stack(pixels) if pixels else torch.zeros(0, 3, image_size, image_size)}


def collate(items: Sequence[dict], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad encoded items into one batch: ``input_ids``, ``labels``, ``attention_mask``, ``position_ids``
    (counting real tokens only, so left padding works) and every picture in slot order."""
    width = max(len(item["input_ids"]) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        span = slice(width - n, width) if padding_side == "left" else slice(0, n)
        ids[row, span], mask[row, span] = torch.tensor(item["input_ids"]), 1
        if item.get("labels") is not None:
            labels[row, span] = torch.tensor(item["labels"])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "position_ids": (mask.cumsum(1) - 1).clamp(min=0),
            "pixel_values": torch.cat([item["pixel_values"] for item in items])}


def shifted_loss(logits: torch.Tensor, labels: torch.Tensor, per_sequence: bool = False) -> torch.Tensor:
    """Next-token cross-entropy over labelled tokens (the LM's own loss, spelled out): the mean over every
    labelled token of the batch, or with ``per_sequence`` the mean over the rows that have labels of each row's
    own mean, so that a two-token answer weighs as much as a sixty-token story."""
    if not per_sequence:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX)
    targets = labels[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX,
                             reduction="none")  # [B, T-1], 0 where ignored
    counts = (targets != IGNORE_INDEX).sum(1)
    labelled = counts > 0  # with none, the mean of nothing is NaN, as the token mean's is
    return (losses.sum(1)[labelled] / counts[labelled]).mean()


def batch_logits(model: FusedLM, batch: dict) -> torch.Tensor:
    """The fused LM's logits ``[B, T, vocab]`` for a batch from :func:`collate`, moved to the model's device."""
    device = model.device
    return model(batch["input_ids"].to(device), batch["pixel_values"].to(device),
                 attention_mask=batch["attention_mask"].to(device), position_ids=batch["position_ids"].to(device),
                 use_cache=False).logits


def fusion_loss(model: FusedLM, batch: dict, per_sequence: bool = False) -> torch.Tensor:
    """The LM loss on the labelled (assistant) tokens of a batch from :func:`collate` (``per_sequence``: as
    :func:`shifted_loss`)."""
    return shifted_loss(batch_logits(model, batch), batch["labels"].to(model.device), per_sequence)


def sample_batches(tokenizer, samples: Sequence[Sample], tokens_per_image: int, batch_size: int,
                   image_size: int = 32, seed: int = 0):
    """``make_batch(step)``: ``batch_size`` of ``samples`` (encoded once, then cached), a function of
    ``(seed, step)`` only, so a resumed run sees the same batches."""
    return cached_batches(len(samples), batch_size, seed,
                          lambda i: encode_with_pictures(tokenizer, samples[i], tokens_per_image, image_size),
                          lambda items: collate(items, tokenizer.pad_token_id))


def cached_batches(pool_size: int, batch_size: int, seed: int, encode, collate_items):
    """``make_batch(step)``: ``collate_items`` of ``batch_size`` items picked from ``range(pool_size)`` by
    ``(seed, step)`` alone, each ``encode(i)`` computed once, when first picked, then cached."""
    encoded: dict[int, object] = {}

    def make_batch(step: int):
        rng = random.Random(seed * 1_000_003 + step)
        picks = rng.sample(range(pool_size), batch_size)
        for i in picks:
            if i not in encoded:
                encoded[i] = encode(i)
        return collate_items([encoded[i] for i in picks])

    return make_batch


def vqa_batches(tokenizer, tokens_per_image: int, batch_size: int, image_size: int = 32, seed: int = 0,
                pool_size: int | None = 20_000):
    """``make_batch(step)`` of training visual questions: drawn from a pool of ``pool_size`` questions made
    once (see :func:`sample_batches`), or, with ``pool_size=None``, ``batch_size`` new questions about new
    pictures for every step (``training_seed(step, seed)``), so no question is ever seen twice. Making and
    encoding 128 of them takes about 20 ms, a few percent of a training step."""
    if pool_size is None:
        def make_batch(step: int) -> dict:
            samples = make_samples("vqa", batch_size, seed=training_seed(step, seed), split="train",
                                   image_size=image_size)
            return collate([encode_with_pictures(tokenizer, s, tokens_per_image, image_size) for s in samples],
                           tokenizer.pad_token_id)
        return make_batch
    if not isinstance(pool_size, int) or pool_size < batch_size:
        raise ValueError(f"pool_size must be an int of at least the batch size ({batch_size}), or None for new "
                         f"questions every step; got {pool_size!r}")
    samples = make_samples("vqa", pool_size, seed=seed, split="train", image_size=image_size)
    return sample_batches(tokenizer, samples, tokens_per_image, batch_size, image_size, seed)


def rehearsal_batches(tokenizer, rows: int, seq_len: int, n_per_task: int = 2000, seed: int = 0):
    """``make_batch(step)`` of the LM's own pretraining conversations (``backbone.lm_pool`` and ``lm_batches``:
    the same tasks, samples and seed), ``rows`` packed rows of ``seq_len`` tokens, for :func:`train_fusion` to
    rehearse. Each picture in them is the one ``<image>`` placeholder the LM was pretrained on."""
    from .backbone import lm_batches, lm_pool

    pool = lm_pool(tokenizer, n_per_task, seed=seed, max_length=seq_len)
    return lm_batches(pool, rows, seq_len, tokenizer.pad_token_id, seed=seed)


def rehearsal_loss(model: FusedLM, batch: dict) -> torch.Tensor:
    """The LM's pretraining loss on a packed batch from :func:`rehearsal_batches`, through the LM with its LoRA
    (``backbone.lm_loss``). No picture is read: the ``[IMGk]`` rows are the LM's own, which prompt fusion does
    not train."""
    from .backbone import lm_loss

    return lm_loss(model.lm, batch, model.device)


def fusion_step_loss(model: FusedLM, batch: dict) -> torch.Tensor:
    """One prompt-fusion step's loss on ``{"answers": ..., "words": ...}``: the answers' loss (:func:`fusion_loss`),
    plus the rehearsed conversations' (:func:`rehearsal_loss`) when ``words`` is a batch, not ``None``."""
    loss = fusion_loss(model, batch["answers"])
    return loss if batch["words"] is None else loss + rehearsal_loss(model, batch["words"])


def train_fusion(model: FusedLM, tokenizer, train_config: TrainConfig, batch_size: int = 32,
                 image_size: int = 32, out_dir=None, device: str = "cpu", progress: bool = True,
                 groups: Sequence[str] = ("projector", "gate", "lora"), pool_size: int | None = 20_000,
                 rehearsal_rows: int = 0, rehearsal_pool: int = 2000, rehearsal_seq_len: int = 256) -> TrainResult:
    """Teach ``model`` to answer ShapeWorld visual questions: train ``groups`` (the rest frozen) on the
    assistant's answers with the shared loop (``training.train``). The history records ``tanh(gate)``.
    ``pool_size``: how many training questions to draw the batches from (``None``: new ones every step;
    see :func:`vqa_batches`).

    ``rehearsal_rows``: with more than 0, every step also rehearses the LM's pretraining (LLaVA mixes text-only
    conversations into its visual instructions for the same reason): that many packed rows of
    ``rehearsal_seq_len`` tokens of its own conversations (``rehearsal_pool`` of each task,
    :func:`rehearsal_batches`), their loss added to the answers'. Trained on two-word answers alone, the LoRA
    unlearns the LM's longer replies: the fused LM, asked in text for a picture, restated 0% of the requests its
    LM restated (``benchmarks/M2CHAT_RECIPE.md``, "Fusion rehearses the LM's words")."""
    if not isinstance(rehearsal_rows, int) or rehearsal_rows < 0:
        raise ValueError(f"rehearsal_rows must be an int >= 0 (0: no rehearsal), got {rehearsal_rows!r}")
    set_trainable(model, groups)
    model.to(device)
    answers = vqa_batches(tokenizer, model.tokens_per_image, batch_size, image_size, seed=train_config.seed,
                          pool_size=pool_size)
    words = (rehearsal_batches(tokenizer, rehearsal_rows, rehearsal_seq_len, rehearsal_pool, seed=train_config.seed)
             if rehearsal_rows else None)

    def make_batch(step: int) -> dict:
        return {"answers": answers(step), "words": None if words is None else words(step)}

    return train(model, lambda batch: fusion_step_loss(model, batch), make_batch, train_config, out_dir=out_dir,
                 device=device, progress=progress, description="prompt fusion",
                 log_extra=lambda: {"gate": model.gate_value()})


# ---------------------------------------------------------------------------------------------
# Answering and scoring
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_replies(model: FusedLM, tokenizer, samples: Sequence[Sample], max_new_tokens: int = 8,
                   image_size: int = 32, batch_size: int = 64) -> list[str]:
    """The assistant's greedy reply to each sample's user turn(s) (everything before its last assistant
    turn), pictures included. Decodes a whole batch at once (left-padded); stops at ``<|end|>``."""
    end_id = tokenizer.convert_tokens_to_ids(END_TOKEN)
    was_training = model.training
    model.eval()
    replies = []
    for start in range(0, len(samples), batch_size):
        chunk = [_prompt_of(s) for s in samples[start:start + batch_size]]
        items = [encode_with_pictures(tokenizer, s, model.tokens_per_image, image_size, add_generation_prompt=True)
                 for s in chunk]
        batch = collate(items, tokenizer.pad_token_id, padding_side="left")
        ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
        embeds = model.embed(ids, batch["pixel_values"].to(model.device))
        out_tokens = torch.zeros((len(ids), 0), dtype=torch.long, device=model.device)
        done = torch.zeros(len(ids), dtype=torch.bool, device=model.device)
        for _ in range(max_new_tokens):
            logits = model.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                              use_cache=False).logits[:, -1]
            logits[:, model.image_token_id] = float("-inf")  # a picture is put in by the system, never written
            token = logits.argmax(-1).masked_fill(done, end_id)
            out_tokens = torch.cat([out_tokens, token[:, None]], 1)
            done |= token == end_id
            if done.all():
                break
            embeds = torch.cat([embeds, model.embed(token[:, None])], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        for row in out_tokens.tolist():
            row = row[:row.index(end_id)] if end_id in row else row
            replies.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return replies


def _prompt_of(sample: Sample) -> Sample:
    """The sample up to (not including) its last assistant turn: what the model is asked."""
    last = max(i for i, t in enumerate(sample.turns) if t.role == "assistant")
    return Sample(sample.id, sample.task, sample.turns[:last], sample.meta)


def vqa_accuracy(model: FusedLM, tokenizer, samples: Sequence[Sample], image_size: int = 32) -> dict:
    """Exact-answer accuracy on visual questions, overall and per question kind, with the replies.

    For ShapeWorld questions (whose ``meta`` holds the scene) also by the number of objects in the picture,
    overall (``per_objects``) and kind by kind (``per_kind_objects``): with one object a question needs no
    lookup, with three the model must find the object the question names (notebook 05)."""
    replies = greedy_replies(model, tokenizer, samples, image_size=image_size)
    right = [r == s.meta["answer"] for r, s in zip(replies, samples)]
    kinds = [s.meta["kind"] for s in samples]
    scores = {"accuracy": sum(right) / len(samples), "n": len(samples), "per_kind": _shares(right, kinds)}
    if all("scene" in s.meta for s in samples):
        objects = [len(scenes_of(s)[0]) for s in samples]
        scores["per_objects"] = _shares(right, objects)
        scores["per_kind_objects"] = {kind: _shares([ok for ok, k in zip(right, kinds) if k == kind],
                                                    [n for n, k in zip(objects, kinds) if k == kind])
                                      for kind in sorted(set(kinds))}
    return {**scores, "replies": replies}


def _shares(right: Sequence[bool], groups: Sequence) -> dict:
    """The share of ``right`` answers in each group (``groups[i]`` is answer ``i``'s), groups in order."""
    return {g: sum(ok for ok, h in zip(right, groups) if h == g) / list(groups).count(g) for g in sorted(set(groups))}


# ---------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------

FUSION_CONFIG, FUSION_WEIGHTS, LORA_DIR = "fusion_config.json", "fusion.safetensors", "lora"


def save_fused(model: FusedLM, folder, lm_dir: str = "../lm", clip_dir: str = "../clip") -> Path:
    """Save what fusion training changed, all or nothing: ``fusion_config.json``, ``fusion.safetensors``
    (projector, gate, ``[IMGk]`` embeddings) and the LoRA adapter in ``lora/`` (``peft``'s format). The
    frozen LM and vision encoder are not copied: ``lm_dir`` and ``clip_dir`` (relative to ``folder``)
    say where they are, so the shipped folders share one copy of each."""
    from safetensors.torch import save_file

    from .checkpoints import quiet, save_folder

    lora = hasattr(model.lm, "peft_config")
    config = {"tokens_per_image": model.tokens_per_image, "feature_layers": list(model.feature_layers),
              "vision_dim": model.projector.mlp[1].in_features,
              "lm_dim": model.projector.mlp[1].out_features, "pool_last": model.projector.pool_last,
              "lm_dir": lm_dir, "clip_dir": clip_dir, "lora": lora}
    weights = {name: tensor.detach().float().contiguous().cpu() for name, tensor in model.state_dict().items()
               if name.split(".")[0] in ("projector", "gate", "gen_embeddings")}

    def write(tmp: Path) -> None:
        (tmp / FUSION_CONFIG).write_text(json.dumps(config, indent=2))
        save_file(weights, tmp / FUSION_WEIGHTS)
        if lora:
            # peft records the base model's path; record where it lies relative to lora/, not this machine's
            # absolute path, and leave out peft's empty model card. It keeps target_modules as a set and
            # writes it in hash order: sorted, the same LoRA writes the same file every time
            configs = list(model.lm.peft_config.values())
            kept = [(c.base_model_name_or_path, c.target_modules) for c in configs]
            for c in configs:
                c.base_model_name_or_path = str(Path("..") / lm_dir)
                if isinstance(c.target_modules, (set, list, tuple)):
                    c.target_modules = sorted(c.target_modules)
            try:
                with quiet():
                    model.lm.save_pretrained(tmp / LORA_DIR, save_embedding_layers=False)  # LoRA only
            finally:
                for c, (path, targets) in zip(configs, kept):
                    c.base_model_name_or_path, c.target_modules = path, targets
            (tmp / LORA_DIR / "README.md").unlink(missing_ok=True)
    return save_folder(folder, write)


def load_fused(folder, device: str = "cpu", lm=None, vision=None) -> tuple[FusedLM, object]:
    """``(model, tokenizer)`` from a folder written by :func:`save_fused` (with its LM and CLIP folders).
    ``lm`` (a ``(model, tokenizer)`` pair) and ``vision`` (a vision model) are used instead of loading those
    folders when given: the ``hf-small`` preset loads them from their checkpoints (``hf.load_system``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .backbone import load_lm
    from .encoders import load_clip

    folder = Path(folder)
    redo = "train one with `m2chat-lite train --preset tiny --stage fusion`, or save it again with save_fused"
    missing = [name for name in (FUSION_CONFIG, FUSION_WEIGHTS) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"no complete fused model in {folder} (missing {', '.join(missing)}); {redo}")
    try:
        config = json.loads((folder / FUSION_CONFIG).read_text())
        lm, tokenizer = lm if lm is not None else load_lm((folder / config["lm_dir"]).resolve())
        vision = vision if vision is not None else load_clip((folder / config["clip_dir"]).resolve())[0].vision_model
        if config["lora"]:
            from peft import PeftModel

            with _quiet_peft():
                lm = PeftModel.from_pretrained(lm, folder / LORA_DIR)
        projector = VisualProjector(config["vision_dim"], config["lm_dim"], config["tokens_per_image"],
                                    pool_last=config.get("pool_last", False))
        model = FusedLM(lm, vision, projector, tokenizer, config["feature_layers"])
        state = load_file(folder / FUSION_WEIGHTS)
        model.load_state_dict(state, strict=False)
        expected = {n for n in model.state_dict() if n.split(".")[0] in ("projector", "gate", "gen_embeddings")}
        if set(state) != expected:
            raise ValueError(f"the weights hold {sorted(set(state) ^ expected)[:3]} that do not match the config")
    except (KeyError, ValueError, RuntimeError, SafetensorError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot load the fused model in {folder} ({type(error).__name__}: {error}); {redo}") \
            from error
    return model.to(device).eval(), tokenizer


def reference_fusion_dir(preset: str = "tiny") -> Path:
    """Where the reference fused model ships: ``data/checkpoints/<preset>/fusion``."""
    return DATA_DIR / "checkpoints" / preset / "fusion"
