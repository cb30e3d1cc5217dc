"""M³FT: the two training stages of M²Chat, on disjoint groups of parameters.

Taught in notebooks ``07_m3ft_stage1_alignment`` and ``08_m3ft_stage2_instruction``. The system being
trained (:class:`M2ChatModel`) is the fused LM of notebook 05, the M³Adapter of notebook 06 and the frozen
generator of notebook 04, whose text encoder is the *teacher*.

**Stage 1, image–text alignment** (``stage1_loss``). Only the adapter and the ``[IMG0..K-1]`` input
embeddings train. For a conversation that ends with the assistant drawing a picture, the LM reads it up to
the ``[IMG]`` span; the adapter turns the hidden states over that span (and the reference picture: the one
before, if any) into ``prompt_embeds`` and a pooled embedding, and

    L = L_diffusion + λ1 · MSE(prompt_embeds, E_text(caption)) + λ2 · MSE(pooled, E_pool(caption))

where ``L_diffusion`` is the frozen generator's denoising loss on the target picture conditioned on the
adapter's output, and ``E_text`` / ``E_pool`` are the teacher's sequence and pooled embeddings of the
target scene's caption. The examples (``alignment_examples``) are caption pairs (no reference) and the
pictures of stories and dialogues (the picture before as the reference: a story frame changes one thing,
a dialogue edit changes one attribute), so the adapter's visual branch and gate have something to learn.
With ``lambda_reference`` (the recipe's is 1) one more term asks the visual branch, alone through the adapter's
output head, for the teacher's embedding of the *reference* picture's caption: it must say what it sees, so that
an edit can keep what the words leave out (``benchmarks/M2CHAT_RECIPE.md``, "The visual branch says what it sees").
With ``lambda_reference_layout`` (the recipe's is 1) the generator's layout planner must also read the reference's
scene from the visual branch alone, cell by cell, as it reads it from that caption: with the sequence MSE alone
the branch saw 85% of the objects the test edits keep, with both 98% (``benchmarks/kept_probe.py``; "The visual
branch says what it sees, in the planner's terms"). With ``reference_cells_weight`` (the recipe's is 4) the output's
layout term weighs more on the cells the picture before fills, where the branches must be fused right.
Two things make stage 1 fit a CPU budget (``benchmarks/M2CHAT_RECIPE.md``, "Fitting 15 minutes"):

- ``cached_steps``: the LM is frozen, so while the ``[IMG]`` embeddings wait, everything before the adapter
  is a fixed function of the example. The first steps train the adapter alone on those outputs, computed
  once (``precompute_alignment``, in batches of about the same length, so that little of the LM's work is
  padding, and in bfloat16 where the CPU has bfloat16 instructions: ``caching_cpu_bf16``); the last steps train
  the ``[IMG]`` embeddings too, through the LM.
- ``diffusion_rows``: the diffusion term sees only the first rows of each batch. It is the costly term (the
  generator's forward and backward pass) and the small one (a few hundredths against the MSE terms' tenths).

Stage 1 also folds the frozen LoRA into the LM's weights while it trains (``fusion.lora_merged``): the same
function, fewer matrix products.

**Stage 2, visual instruction** (``stage2_loss``). A disjoint group trains: LoRA on the LM, the projector and
the fusion gate (notebook 05); the adapter is frozen (its gate too, unless ``train_adapter_gate=True``, which
only the gate ablations of notebook 10 use). The loss is the LM's loss on the assistant's tokens of stories,
dialogues and visual questions: the words, and when to write the ``[IMG]`` span (in the recipe each conversation
weighs once, ``per_conversation``, so a one-word answer counts as much as a story), **plus** stage 1's loss on
alignment examples, weighted by ``alignment_weight`` (1 by default), as the official stage 2 keeps its three
losses. The adapter is frozen, so that term moves only the LoRA: it keeps the hidden states the adapter reads
where stage 1 left them. Without it (``alignment_weight=0``) the LoRA drifts those states and the pictures
suffer: on the chain shipped before 2026-11-27, 800 steps took the benchmark's fully-right pictures from
17.3% after stage 1 to 8.7%; with it, to 18.3% (``benchmarks/M2CHAT_RECIPE.md``). With ``diffusion_rows=0``
the term keeps only its teacher-matching (MSE) parts and the generator is not run in stage 2. With
``retention_weight`` (0 in the shipped recipe) one more term, :func:`retention_loss`, keeps the answers to visual
questions close to those of prompt fusion, the model stage 2 starts from. With ``lora_keep`` below 1 (1 in the
shipped recipe) the LoRA goes part of the way back to fusion's once stage 2 is done (:func:`interpolate_lora`,
WiSE-FT): the answers come back, and the stories the system writes in its own words get shorter. With
``anchor_weight`` (0.003 in the shipped recipe) each step adds the LoRA's squared distance from fusion's
(:func:`lora_drift`, L2-SP), so stage 2 learns where it costs the questions least (notebook 08, "An anchor on the
LoRA").

``trainable_groups(stage)`` names each stage's parameters; ``check_disjoint`` proves the two stages share
none (tested, with a test that frozen weights do not move).

**One joint stage** (``train_joint``) is not the recipe but its ablation (notebook 10): both groups train
together on ``stage-1 loss + stage-2 loss``, so the LM's LoRA also moves to please the adapter and the
adapter chases an LM that is still changing, the entanglement the paper's two stages avoid.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import world
from .adapter import AdapterConfig, AdapterOutput, M3Adapter, condition_span, gather_spans
from .checkpoints import save_folder
from .data import Image, Sample, Turn, image_to_tensor
from .diffusion import (check_caption_samples, diffusion_loss, generate_for_embeds, generate_for_prompts, layout_of,
                        score_pictures)
from .encoders import encode_text
from .fusion import (FusedLM, batch_logits, cached_batches, collate, encode_with_pictures, fusion_loss, load_fused,
                     lora_merged, sample_batches, save_fused, set_trainable)
from .layout import ATTRIBUTES
from .tokenizer import IGNORE_INDEX, image_gen_tokens
from .training import TrainConfig, TrainResult, data_parallel, train
from .utils import DATA_DIR, autocast_context, cpu_has_bf16_instructions
from .world.samples import make_samples, scenes_of
from .world.scene import GRID

STAGES = ("stage1", "stage2")
JOINT = "joint"  # the ablation: both stages' groups and losses at once (train_joint)
CONTEXT_TOKENS = 40  # tokens before the [IMG] span that the semantic branch reads: a whole caption request
VISUAL_LAYER = 0  # the vision encoder layer the adapter's visual branch reads: low-level patch features
# The LM layers the semantic branch reads, side by side: the input embeddings (which words and pictures, as
# such) and the last layer (what the LM makes of them in context). The last layer alone is tuned to predict
# the *next* token and hides the current one: with it alone the adapter matched the teacher's sequence to an
# MSE of 0.42 after 300 steps, with the input embeddings 0.28 (benchmarks/M2CHAT_RECIPE.md). Each layer is
# layer-normed first (M2ChatModel.normalize_layers): raw, the input embeddings are about 12 times smaller
# than the last layer, and the adapter learnt to read the words far more slowly.
LM_LAYERS = (0, -1)


class M2ChatModel(nn.Module):
    """The trainable system: ``fused`` (LM + vision + projector + gate), ``adapter``, and the frozen
    generator pieces ``unet``, ``scheduler`` (for training) and ``teacher`` (the generator's CLIP text
    encoder, with ``teacher_tokenizer``)."""

    def __init__(self, fused: FusedLM, adapter: M3Adapter, unet, scheduler, teacher, teacher_tokenizer,
                 context_tokens: int = CONTEXT_TOKENS, visual_layer: int = VISUAL_LAYER,
                 lm_layers: Sequence[int] = LM_LAYERS, vae=None, image_size: int = 32,
                 normalize_layers: bool = True):
        super().__init__()
        self.fused, self.adapter, self.unet, self.teacher = fused, adapter, unet, teacher
        self.scheduler, self.teacher_tokenizer = scheduler, teacher_tokenizer
        # a latent generator (hf-small's Stable Diffusion) denoises VAE latents, the tiny one pixels
        self.vae, self.image_size = vae, image_size
        self.source: dict[str, Path] = {}  # the folders of the frozen parts, when loaded by load_system
        self.record: dict = {}  # how the system was trained, when loaded by load_system
        self.hf_config = None  # an hf-small system: the config naming its checkpoints (hf.build_system)
        self.context_tokens, self.visual_layer, self.lm_layers = context_tokens, visual_layer, tuple(lm_layers)
        # each LM layer layer-normed before the adapter reads them side by side (FusedLM.hidden_states);
        # systems saved before this option existed read them raw, and load that way
        self.normalize_layers = normalize_layers
        self.unet.requires_grad_(False)
        self.teacher.requires_grad_(False)
        if vae is not None:
            vae.requires_grad_(False)

    @torch.no_grad()
    def diffusion_targets(self, pictures: torch.Tensor) -> torch.Tensor:
        """What the generator denoises for ``pictures`` in [-1, 1]: the pictures themselves, or with a VAE
        its latents (the mean of the posterior times the VAE's scaling factor, as Stable Diffusion trains)."""
        pictures = pictures.to(self.device)
        if self.vae is None:
            return pictures
        latents = self.vae.encode(pictures.to(self.vae.dtype)).latent_dist.mean
        return (latents * self.vae.config.scaling_factor).float()

    @property
    def device(self) -> torch.device:
        return self.fused.device

    def reference_features(self, pictures: torch.Tensor) -> torch.Tensor:
        """Low-level patch features ``[N, 1 + P, d_vision]`` of reference pictures (frozen encoder)."""
        with torch.no_grad():
            out = self.fused.vision_model(pixel_values=pictures.to(self.device), output_hidden_states=True)
        return out.hidden_states[self.visual_layer].float()

    def adapter_inputs(self, batch: dict) -> dict:
        """What the adapter reads for the **last** ``[IMG]`` span of each row of ``batch`` (see
        :func:`alignment_batch`): ``states [B, S, lm_dim]`` (the LM's hidden states over the span, right-padded)
        with ``state_mask``, and ``visual`` (the reference picture's patch features) with ``has_reference``."""
        device = self.device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hidden = self.fused.hidden_states(ids, batch["pixel_values"].to(device), attention_mask=mask,
                                          position_ids=batch["position_ids"].to(device), layers=self.lm_layers,
                                          normalize=self.normalize_layers)
        spans = condition_span(ids, self.fused.gen_token_ids, self.context_tokens, mask)
        last = {row: (row, start, end) for row, start, end in spans}  # later spans overwrite earlier ones
        if sorted(last) != list(range(len(ids))):
            raise ValueError("every row must end with an [IMG0..K-1] span to condition on")
        states, state_mask = gather_spans(hidden, [last[row] for row in range(len(ids))])
        return {"states": states, "state_mask": state_mask, "visual": self.reference_features(batch["reference"]),
                "has_reference": batch["has_reference"].to(device)}

    def condition(self, batch: dict, return_attention: bool = False, return_visual: bool = False) -> AdapterOutput:
        """The adapter's conditioning for the last ``[IMG]`` span of each row of ``batch``: from
        :meth:`adapter_inputs`, or from the batch itself when it carries them (stage 1's cached steps,
        :func:`precompute_alignment`)."""
        inputs = batch if "states" in batch else self.adapter_inputs(batch)
        device = self.device
        return self.adapter(inputs["states"].to(device), inputs["state_mask"].to(device), inputs["visual"].to(device),
                            has_reference=inputs["has_reference"].to(device), return_attention=return_attention,
                            return_visual=return_visual)


def build_m2chat(fused: FusedLM, pipeline, config, gate_mode: str = "adaptive", seed: int = 0,
                 num_layers: int | None = None, visual_reads_words: bool = False) -> M2ChatModel:
    """A fresh adapter (from ``seed``) sized from the fused LM, the vision encoder and the generator's text
    encoder, around ``fused`` and the diffusion ``pipeline`` (notebook 04). ``visual_reads_words``: the
    adapter's visual branch reads the LM's span beside the picture (``AdapterConfig``)."""
    teacher = pipeline.text_encoder
    if teacher is None:
        raise ValueError("the pipeline has no text encoder; M³FT needs it as the teacher (load it with its CLIP)")
    cond_dim, pooled_dim, cond_len = teacher_dims(teacher)
    adapter_config = AdapterConfig(
        lm_dim=fused.lm.config.hidden_size * len(LM_LAYERS), vision_dim=fused.vision_model.config.hidden_size,
        cond_dim=cond_dim, pooled_dim=pooled_dim, num_queries=cond_len,
        num_layers=num_layers or config.adapter_num_layers, num_heads=config.adapter_num_heads, gate_mode=gate_mode,
        semantic_positions=CONTEXT_TOKENS + len(fused.gen_token_ids), visual_positions=vision_positions(fused),
        visual_reads_words=visual_reads_words)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        adapter = M3Adapter(adapter_config)
    return M2ChatModel(fused, adapter, pipeline.unet, pipeline.training_scheduler(), teacher, pipeline.tokenizer,
                       vae=getattr(pipeline, "vae", None), image_size=pipeline.image_size).to(fused.device)


def teacher_dims(teacher) -> tuple[int, int, int]:
    """``(cond_dim, pooled_dim, cond_len)`` of a teacher text encoder: the tiny CLIP of notebook 02 (a
    ``CLIPModel``: its projected pooled embedding) or Stable Diffusion's ``CLIPTextModel`` (its pooler output)."""
    text = getattr(teacher.config, "text_config", teacher.config)
    pooled = getattr(teacher.config, "projection_dim", None) if hasattr(teacher, "text_projection") else None
    return text.hidden_size, pooled or text.hidden_size, text.max_position_embeddings


def vision_positions(fused: FusedLM) -> int:
    """How many feature positions the vision encoder gives per picture (``1 + P``: class token and patches)."""
    with torch.no_grad():
        probe = torch.zeros(1, 3, fused.vision_model.config.image_size, fused.vision_model.config.image_size)
        return fused.vision_features(probe).shape[1]


# ---------------------------------------------------------------------------------------------
# Which parameters each stage trains
# ---------------------------------------------------------------------------------------------


def trainable_groups(stage: str, train_adapter_gate: bool = False) -> dict[str, Sequence[str]]:
    """``{"fused": groups for fusion.set_trainable, "adapter": "all" | "gate" | "none"}`` for a stage."""
    if stage == "stage1":
        return {"fused": ["gen_embeddings"], "adapter": "all"}
    if stage == "stage2":
        return {"fused": ["lora", "projector", "gate"], "adapter": "gate" if train_adapter_gate else "none"}
    if stage == JOINT:
        first, second = trainable_groups("stage1"), trainable_groups("stage2")
        return {"fused": [*first["fused"], *second["fused"]], "adapter": "all"}
    raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)} (or {JOINT!r}, the ablation)")


def set_stage(model: M2ChatModel, stage: str, train_adapter_gate: bool = False) -> list[str]:
    """Freeze everything, then unfreeze the stage's groups. Returns the trainable parameter names."""
    groups = trainable_groups(stage, train_adapter_gate)
    model.requires_grad_(False)
    set_trainable(model.fused, groups["fused"])
    if groups["adapter"] == "all":
        model.adapter.requires_grad_(True)
    elif groups["adapter"] == "gate":
        model.adapter.static_gate.requires_grad_(True)
        model.adapter.adaptive_gate.requires_grad_(True)
    return [name for name, param in model.named_parameters() if param.requires_grad]


def check_disjoint(model: M2ChatModel) -> tuple[set[str], set[str]]:
    """The parameter names stage 1 and stage 2 train; raises if they share any."""
    first, second = set(set_stage(model, "stage1")), set(set_stage(model, "stage2"))
    shared = first & second
    if shared:
        raise AssertionError(f"stage 1 and stage 2 both train {sorted(shared)[:5]}")
    return first, second


# ---------------------------------------------------------------------------------------------
# Stage 1 data: conversations that end with a drawn picture
# ---------------------------------------------------------------------------------------------


@dataclass
class AlignmentExample:
    sample: Sample  # the conversation up to and including the target picture
    caption: str  # what the teacher reads: the target scene described in full
    target: object  # the target picture (PIL)
    reference: object | None  # the picture before it in the conversation, if any
    reference_caption: str | None = None  # what the teacher reads for the reference picture


def _cut_after_picture(sample: Sample, turn_index: int, picture_index: int) -> Sample:
    """The conversation up to turn ``turn_index``, whose content ends at its ``picture_index``-th picture."""
    turns = sample.turns[:turn_index]
    content, seen = [], 0
    for segment in sample.turns[turn_index].content:
        content.append(segment)
        if isinstance(segment, Image):
            if seen == picture_index:
                break
            seen += 1
    return Sample(sample.id, sample.task, turns + [Turn(sample.turns[turn_index].role, content)], sample.meta)


def picture_captions(sample: Sample) -> list[str]:
    """What the teacher reads for each picture of ``sample``.

    A caption pair (ShapeWorld's or real, ``meta["caption"]``) gives its own caption: the words the LM reads
    too, as in the paper's stage 1, where the LM and the text encoder read one caption. Otherwise a ShapeWorld
    picture's scene described in full (a story frame or an edited picture, which no words in the conversation
    describe whole); for real data (no scenes) the words just before the picture in its turn (a story's
    sentence), else the user's last words (a dialogue's request). Until 2026-12-03 a ShapeWorld caption pair's
    teacher read the scene's canonical caption: the adapter had to rephrase and reorder, and learnt two-object
    scenes far more slowly (``benchmarks/M2CHAT_RECIPE.md``, "Two objects through the adapter")."""
    if sample.meta.get("caption"):
        return [sample.meta["caption"]] * len(sample.images())
    try:
        return [world.caption(scene) for scene in scenes_of(sample)]
    except (KeyError, TypeError):
        pass
    captions, request = [], ""
    for turn in sample.turns:
        words = ""
        for segment in turn.content:
            if isinstance(segment, Image):
                captions.append(words or request)
            elif segment.text.strip():
                words = segment.text.strip()
        if turn.role == "user" and words:
            request = words
    return captions


def examples_of(sample: Sample, rng: random.Random | None = None) -> list[AlignmentExample]:
    """Every picture the assistant draws in ``sample``, as an alignment example (or one, chosen by ``rng``)."""
    captions = picture_captions(sample)
    pictures = sample.images()
    found, index = [], 0
    for t, turn in enumerate(sample.turns):
        drawn = 0
        for segment in turn.content:
            if not isinstance(segment, Image):
                continue
            if turn.role == "assistant":
                found.append(AlignmentExample(_cut_after_picture(sample, t, drawn), captions[index],
                                              pictures[index].load(), pictures[index - 1].load() if index else None,
                                              captions[index - 1] if index else None))
                drawn += 1
            index += 1
    if rng is not None and found:
        return [rng.choice(found)]
    return found


ALIGNMENT_TASKS = ("caption", "story", "dialogue")
# A task of its own for the pool: a dialogue's edits alone (a picture drawn from the one before it), not its first
# picture, which asks what a caption pair asks
EDIT_TASK = "edit"


def alignment_examples(n: int, seed: int = 0, split: str = "train",
                       tasks: Sequence[str] | dict[str, float] | None = None,
                       image_size: int = 32) -> list[AlignmentExample]:
    """``n`` examples (one drawn picture per conversation), deterministic from ``seed``: evenly from a sequence
    of ``tasks`` (default: ``ALIGNMENT_TASKS``), or with ``tasks`` a ``{task: share}`` dict (shares adding up
    to 1), ``round(n · share)`` from each. The recipe draws half its pool from dialogues: their edits are where
    untouched objects are lost (``benchmarks/M2CHAT_RECIPE.md``, "Half the alignment pool from dialogues"). The
    task ``"edit"`` (:data:`EDIT_TASK`) takes a dialogue's edits alone (not measured into the recipe: "Edits
    alone")."""
    shares = _task_shares(ALIGNMENT_TASKS if tasks is None else tasks)
    rng = random.Random(f"alignment-{seed}-{split}")
    out = []
    for task, share in shares.items():
        per_task = -(-n // len(shares)) if share is None else round(n * share)
        made = []
        source = "dialogue" if task == EDIT_TASK else task
        for sample in make_samples(source, 3 * per_task, seed=seed, split=split, image_size=image_size):
            found = examples_of(sample)
            if task == EDIT_TASK:
                found = [example for example in found if example.reference is not None]
            if found:
                made.append(rng.choice(found))
            if len(made) >= per_task:
                break
        out += made[:per_task]
    return out[:n]


def _task_shares(tasks: Sequence[str] | dict[str, float]) -> dict[str, float | None]:
    """``{task: share}`` (``None``: an even share) for :func:`alignment_examples`, checked."""
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty sequence of task names or a {{task: share}} dict, got {tasks!r}")
    if not isinstance(tasks, dict):
        return dict.fromkeys(tasks)
    if any(not isinstance(v, (int, float)) or v < 0 for v in tasks.values()) or abs(sum(tasks.values()) - 1) > 1e-6:
        raise ValueError(f"task shares must be numbers of 0 or more adding up to 1, got {tasks!r}")
    return dict(tasks)


def draw_references(examples: Sequence[AlignmentExample], generator, share: float, seed: int = 0,
                    num_inference_steps: int = 4, guidance_scale: float = 1.0, batch_size: int = 128,
                    progress: bool = False, cpu_bf16: bool = False) -> list[AlignmentExample]:
    """The examples with ``share`` of the reference pictures *the assistant drew* (a story's frame before, a
    dialogue's picture before an edit; a user's upload stays as it is) redrawn by the frozen ``generator`` from
    the reference's caption, in the example and in the conversation the LM reads. The input is not changed.

    Why: in use, the picture before an edit is the system's own drawing, not ShapeWorld's clean rendering, and
    an adapter trained on clean ones reads its own drawings less well. Given the benchmark's pictures before
    each edit, the shipped stage 1 of session 38 kept 92.3% of the untouched objects; given its own drawings,
    75.0% (``benchmarks/M2CHAT_RECIPE.md``, "The picture before is the system's own"). Four sampling steps draw
    pictures that look much like the system's twenty (by eye; not scored) for a fifth of the cost at guidance 3,
    a tenth without guidance (``guidance_scale=1``; ``benchmarks/RESULTS.md``, session 39). Which references are
    redrawn, and each one's starting noise, follow from ``seed``. ``cpu_bf16``: on a CPU with bfloat16
    instructions (:func:`~m2chat_lite.utils.cpu_has_bf16_instructions`), draw in a bfloat16 autocast: half the
    time, the same oracle scores (``benchmarks/M2CHAT_RECIPE.md``, "Drawn references join the recipe"); ignored
    elsewhere."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be between 0 and 1, got {share!r}")
    rng = random.Random(f"drawn-references-{seed}")
    out, chosen = list(examples), []
    for i, example in enumerate(out):
        if example.reference is None or example.reference_caption is None:
            continue
        places = [(t, j) for t, turn in enumerate(example.sample.turns)
                  for j, segment in enumerate(turn.content) if isinstance(segment, Image)]
        turn, _ = places[-2]  # the target is the last picture; the reference the one before it
        if example.sample.turns[turn].role == "assistant" and rng.random() < share:
            chosen.append((i, places[-2]))
    if not chosen:
        return out
    with autocast_context(generator.device, cpu_bf16 and cpu_has_bf16_instructions()):
        pictures = generate_for_prompts(generator, [out[i].reference_caption for i, _ in chosen], seed=seed,
                                        batch_size=batch_size, num_inference_steps=num_inference_steps,
                                        guidance_scale=guidance_scale,
                                        progress="stage 1: drawing the references" if progress else None)
    for (i, (t, j)), picture in zip(chosen, pictures):
        example = out[i]
        turns = list(example.sample.turns)
        content = list(turns[t].content)
        content[j] = Image(image=picture)
        turns[t] = Turn(turns[t].role, content)
        sample = Sample(example.sample.id, example.sample.task, turns, example.sample.meta)
        out[i] = dataclasses.replace(example, sample=sample, reference=picture)
    return out


def alignment_batch(model: M2ChatModel, tokenizer, examples: Sequence[AlignmentExample],
                    image_size: int | None = None) -> dict:
    """A batch for :meth:`M2ChatModel.condition` and :func:`stage1_loss`: the conversations cut right after
    their last ``[IMG0..K-1]`` (the target picture itself is not in the LM's input), the pictures before it,
    the reference pictures, and the targets (pictures and captions), at ``image_size`` (the model's)."""
    return collate_alignment([encode_alignment(model, tokenizer, e, image_size) for e in examples],
                             tokenizer.pad_token_id)


def encode_alignment(model: M2ChatModel, tokenizer, example: AlignmentExample, image_size: int | None = None) -> dict:
    """One example of :func:`alignment_batch`, as tensors (training encodes each example once and caches it)."""
    image_size = image_size or model.image_size
    last_gen = tokenizer.convert_tokens_to_ids(image_gen_tokens(len(model.fused.gen_token_ids))[-1])
    item = encode_with_pictures(tokenizer, example.sample, model.fused.tokens_per_image, image_size)
    cut = len(item["input_ids"]) - item["input_ids"][::-1].index(last_gen)
    blank = torch.zeros(3, image_size, image_size)
    return {"input_ids": item["input_ids"][:cut], "labels": None, "pixel_values": item["pixel_values"][:-1],
            "reference": image_to_tensor(example.reference) if example.reference is not None else blank,
            "has_reference": example.reference is not None, "target": image_to_tensor(example.target),
            "caption": example.caption, "reference_caption": example.reference_caption or example.caption}


def collate_alignment(items: Sequence[dict], pad_token_id: int) -> dict:
    """Pad and stack :func:`encode_alignment` items into one batch."""
    batch = collate([{k: item[k] for k in ("input_ids", "labels", "pixel_values")} for item in items], pad_token_id)
    batch["reference"] = torch.stack([item["reference"] for item in items])
    batch["has_reference"] = torch.tensor([item["has_reference"] for item in items])
    batch["target"] = torch.stack([item["target"] for item in items])
    batch["captions"] = [item["caption"] for item in items]
    batch["reference_captions"] = [item["reference_caption"] for item in items]
    return batch


def reference_sequences(model: M2ChatModel, batch: dict) -> torch.Tensor:
    """The teacher's sequence embeddings ``[R, N, d]`` of the reference pictures' captions, for the ``R`` rows of
    ``batch`` that have a reference picture, in order (what :func:`stage1_loss`'s reference term scores)."""
    captions = [c for c, has in zip(batch["reference_captions"], batch["has_reference"].tolist()) if has]
    return encode_text(model.teacher, model.teacher_tokenizer, captions, model.device)[0]


_CACHE_CHUNK = 1024  # examples encoded at a time by precompute_alignment, then cached in batches sorted by length


@torch.no_grad()
def precompute_alignment(model: M2ChatModel, tokenizer, examples: Sequence[AlignmentExample], batch_size: int = 64,
                         progress: bool = False, cpu_bf16: bool = False) -> list[dict]:
    """Everything frozen in a stage-1 step, computed once per example: what the adapter reads
    (:meth:`M2ChatModel.adapter_inputs`: the LM's states over the caption and ``[IMG]`` span, the reference
    picture's patch features), what its output is scored against (the teacher's embeddings of the caption)
    and what the generator denoises (the target picture, or its latents).

    The LM's states depend on the trainable ``[IMG]`` embeddings, so they stay exact only while those have
    not moved: :func:`train_stage1`'s ``cached_steps``. Memory: about 115 KB per tiny example (1.3 GB for
    the recipe's 12,000, the teacher's reading of each reference caption included); mind it at larger sizes.
    With a layout planner in the generator, its readings of the teacher's sequences of the caption and of the
    reference's caption (:func:`layout_targets`) are cached too.

    ``cpu_bf16``: on a CPU with bfloat16 instructions (:func:`~m2chat_lite.utils.cpu_has_bf16_instructions`),
    what the adapter reads (the LM's states, the reference's patch features) is computed in a bfloat16 autocast,
    a quarter to a third less time for the whole cache; what it is scored against (the teacher's embeddings, the
    layout targets) stays float32 (``benchmarks/M2CHAT_RECIPE.md``, "A faster M³FT"). Ignored elsewhere."""
    out: list[dict | None] = [None] * len(examples)
    reads_bf16 = cpu_bf16 and cpu_has_bf16_instructions()
    planner = layout_of(model.unet)
    bar = tqdm(total=len(examples), desc="stage 1: caching the frozen parts", disable=not progress, leave=False)
    for chunk_start in range(0, len(examples), _CACHE_CHUNK):
        # batch examples of about the same length together (within a chunk, to bound the memory of the encoded
        # examples): a batch pads every conversation to its longest, and the LM's pass over the padding is
        # wasted; sorted, caching takes a quarter to a third less time (benchmarks/M2CHAT_RECIPE.md, "A GPU search")
        items = [encode_alignment(model, tokenizer, e) for e in examples[chunk_start:chunk_start + _CACHE_CHUNK]]
        order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = collate_alignment([items[i] for i in rows], tokenizer.pad_token_id)
            with autocast_context(model.device, reads_bf16):
                inputs = model.adapter_inputs(batch)
            inputs = {key: value.float() if value.is_floating_point() else value for key, value in inputs.items()}
            teacher_seq, teacher_pooled = encode_text(model.teacher, model.teacher_tokenizer, batch["captions"],
                                                      model.device)
            with_reference = batch["has_reference"].tolist()
            targets = model.diffusion_targets(batch["target"])
            layouts = layout_targets(planner, teacher_seq) if planner is not None else None
            # the teacher's reading of each reference's caption, and the planner's of that: one row per reference
            reference_seq = reference_sequences(model, batch).float() if any(with_reference) else None
            reference_layouts = layout_targets(planner, reference_seq) \
                if planner is not None and reference_seq is not None else None
            nth_reference = {row: n for n, row in enumerate(r for r, has in enumerate(with_reference) if has)}
            for row, index in enumerate(rows):
                item = {"states": inputs["states"][row, inputs["state_mask"][row]].cpu(),
                        "visual": inputs["visual"][row].cpu(), "has_reference": bool(inputs["has_reference"][row]),
                        "teacher_seq": teacher_seq[row].float().cpu(), "teacher_pooled": teacher_pooled[row].float().cpu(),
                        "diffusion_target": targets[row].cpu(), "caption": batch["captions"][row]}
                # a row without a reference has no reference term: its own caption's sequence stands in (shared)
                n = nth_reference.get(row)
                item["reference_seq"] = reference_seq[n].cpu() if n is not None else item["teacher_seq"]
                if layouts is not None:
                    item["teacher_layout"] = layouts[row].cpu()
                    # the planner's reading of the reference's caption (:func:`stage1_loss`'s reference layout term)
                    item["reference_layout"] = reference_layouts[n].cpu() if n is not None else item["teacher_layout"]
                out[chunk_start + index] = item
            bar.update(len(rows))
    bar.close()
    return out


def collate_precomputed(items: Sequence[dict]) -> dict:
    """A batch of :func:`precompute_alignment` items for :func:`stage1_loss`; the states right-padded with a
    mask, as :meth:`M2ChatModel.adapter_inputs` gives them."""
    states = nn.utils.rnn.pad_sequence([item["states"] for item in items], batch_first=True)
    lengths = torch.tensor([len(item["states"]) for item in items])
    batch = {"states": states, "state_mask": torch.arange(states.shape[1])[None] < lengths[:, None],
             "has_reference": torch.tensor([item["has_reference"] for item in items]),
             "captions": [item["caption"] for item in items]}
    for key in ("visual", "teacher_seq", "teacher_pooled", "diffusion_target", "reference_seq"):
        batch[key] = torch.stack([item[key] for item in items])
    for key in ("teacher_layout", "reference_layout"):  # only with a layout planner in the generator
        if key in items[0]:
            batch[key] = torch.stack([item[key] for item in items])
    return batch


# ---------------------------------------------------------------------------------------------
# The losses
# ---------------------------------------------------------------------------------------------


def stage1_loss(model: M2ChatModel, batch: dict, lambda_seq: float = 1.0, lambda_pooled: float = 1.0,
                generator: torch.Generator | None = None, diffusion_rows: int | None = None,
                lambda_layout: float = 1.0, lambda_reference: float = 0.0,
                lambda_reference_layout: float = 0.0, reference_cells_weight: float = 0.0
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """``L_diffusion + λ1·MSE(seq) + λ2·MSE(pooled) + λ3·L_layout + λ4·L_reference + λ5·L_reference_layout`` and
    its parts (floats, for logging).

    ``L_reference`` (``lambda_reference`` = λ4, 0 by default, 1 in the recipe): on the rows with a reference
    picture, the MSE between the visual branch's output alone, through the adapter's output head
    (``AdapterOutput.visual_embeds``), and the teacher's sequence embedding of the reference picture's caption.
    The other terms only ask for the *edited* scene, where the words already say the change; this one asks the
    visual branch to say everything it sees, which is what an edit must keep. It trains the visual branch and
    the output head, never the semantic branch.

    ``L_reference_layout`` (``lambda_reference_layout`` = λ5, 0 by default, 1 in the recipe): the same rows and the
    same branch, in the layout planner's terms (:func:`layout_matching_loss` of the visual branch's output against
    the planner's reading of the reference's caption). MSE to a sequence asks for the teacher's word order and
    leaves errors the planner is sensitive to, as it did for the output (``L_layout`` below); read by the planner,
    the visual branch of a stage 1 trained without this term saw 85% of the objects the test edits keep, with it
    98%; the pictures kept 88.6% against 86.2% (``benchmarks/kept_probe.py``; ``benchmarks/M2CHAT_RECIPE.md``, "The
    visual branch says what it sees, in the planner's terms"). It adds 7% to a cached step.

    ``L_layout`` (:func:`layout_matching_loss`) is there when the generator has a layout planner (the tiny
    preset's): the planner must read the same scene from the adapter's sequence as from the teacher's. MSE to
    the teacher's sequence alone leaves errors the planner is sensitive to: the stage-1 adapter trained before
    the planner existed had an MSE of about 0.3 and the planner read 7.5% of one-object scenes from it.

    ``reference_cells_weight`` (0 by default, 4 in the recipe): on a row with a reference picture, ``L_layout``
    counts each cell that holds an object in the picture before (:func:`reference_cells`) ``1 + reference_cells_weight``
    times as much as the row's other cells, and the row keeps its total weight (``layout_matching_loss``'s
    ``cell_weights``). Those are the cells where the two branches can disagree (the visual branch says what was there,
    the words what changes): where an edit keeps an object, changes one in place, or moves one away and must leave the
    cell empty. At stage 1 (one thread, seed 0), read by ``benchmarks/kept_probe.py``: without the weight the visual
    branch saw 97.6% of what the test edits keep and the output asked for 88.6%, most of the rest lost in the fusion
    of the branches; with it at 4 the output asked for 94.3% and the pictures kept 93.5%, at 2 92.7%. Added to the
    term instead of taken from the row's other cells, the weight took from the rows without a reference too, and two
    of three such runs never learnt two-object captions (37% of the test captions drawn right, against 99%)
    (``benchmarks/M2CHAT_RECIPE.md``, "The fused output weighs the cells of the picture before").

    ``diffusion_rows`` (``None``: all) is how many rows of the batch the diffusion term sees; the two MSE
    terms see every row. The diffusion term costs a forward and a backward pass of the generator per row and
    its gradient is noisy (one random timestep and noise per picture), while the MSE terms are nearly free:
    on a quarter of the batch a stage-1 step takes 28% less time (``benchmarks/M2CHAT_RECIPE.md``, "Fitting
    15 minutes"). On a few rows the pass has a fixed price (about 30 ms on 2 CPU threads, then 10 ms a row), and
    the recipe's one row (the same term in expectation, noisier) makes a cached step 12% cheaper than four
    ("A faster M³FT"). ``0`` drops the term (MSE only). A batch from :func:`collate_precomputed` brings the
    adapter's inputs, the teacher's embeddings and the generator's targets with it."""
    if diffusion_rows is not None and diffusion_rows < 0:
        raise ValueError(f"diffusion_rows must be 0 or more (None: the whole batch); got {diffusion_rows}")
    device = model.device
    condition = model.condition(batch, return_visual=True)
    if "teacher_seq" in batch:  # precomputed, with the adapter's inputs (precompute_alignment)
        teacher_seq, teacher_pooled = batch["teacher_seq"].to(device), batch["teacher_pooled"].to(device)
    else:
        with torch.no_grad():
            teacher_seq, teacher_pooled = encode_text(model.teacher, model.teacher_tokenizer, batch["captions"], device)
    rows = len(batch["captions"]) if diffusion_rows is None else min(diffusion_rows, len(batch["captions"]))
    targets = batch["diffusion_target"][:rows].to(device) if "diffusion_target" in batch else \
        model.diffusion_targets(batch["target"][:rows])
    l_diffusion = condition.prompt_embeds.new_zeros(()) if rows == 0 else \
        diffusion_loss(model.unet, model.scheduler, targets, condition.prompt_embeds[:rows], condition.pooled[:rows],
                       generator=generator)
    l_seq = F.mse_loss(condition.prompt_embeds, teacher_seq)
    l_pooled = F.mse_loss(condition.pooled, teacher_pooled)
    loss = l_diffusion + lambda_seq * l_seq + lambda_pooled * l_pooled
    planner = layout_of(model.unet)
    has_reference = batch["has_reference"].to(device)
    # the reference's caption as the teacher reads it and, where a term needs it, as the planner reads that: once
    reference_seq = reference_layout = None
    if bool(has_reference.any()):
        if "reference_seq" in batch:
            reference_seq = batch["reference_seq"].to(device)[has_reference]
        else:
            with torch.no_grad():
                reference_seq = reference_sequences(model, batch)
        if planner is not None and (lambda_reference_layout or reference_cells_weight):
            reference_layout = reference_layouts(model, batch, reference_seq)
    cached_layout = batch["teacher_layout"].to(device) if "teacher_layout" in batch else None
    cell_weights = None
    if reference_cells_weight and planner is not None:
        cell_weights = 1.0 + reference_cells_weight * reference_cells(model, batch, reference_layout).float()
    l_layout = layout_matching_loss(planner, condition.prompt_embeds, teacher_seq, cached_layout, cell_weights) \
        if planner is not None else condition.prompt_embeds.new_zeros(())  # logged even when λ3 = 0
    loss = loss + lambda_layout * l_layout
    l_reference = condition.prompt_embeds.new_zeros(())  # logged even when λ4 = 0, as the layout term is
    l_reference_layout = condition.prompt_embeds.new_zeros(())  # logged when λ5 > 0 (it costs a planner pass)
    if reference_seq is not None:
        visual = condition.visual_embeds[has_reference]
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(lambda_reference)):
            l_reference = F.mse_loss(visual, reference_seq)
        if lambda_reference:
            loss = loss + lambda_reference * l_reference
        if lambda_reference_layout and planner is not None:
            l_reference_layout = layout_matching_loss(planner, visual, reference_seq, reference_layout)
            loss = loss + lambda_reference_layout * l_reference_layout
    gate = condition.gate[has_reference]
    parts = {"diffusion": l_diffusion.item(), "seq_mse": l_seq.item(), "pooled_mse": l_pooled.item(),
             "layout": l_layout.item(), "reference": l_reference.item(), "reference_layout": l_reference_layout.item(),
             "gate": gate.mean().item() if gate.numel() else 0.0}
    return loss, parts


def layout_targets(planner, teacher_seq: torch.Tensor) -> torch.Tensor:
    """What the frozen layout planner reads from the teacher's sequence: ``[B, 9, classes]``, the probabilities of
    each attribute of :data:`layout.ATTRIBUTES` side by side (the soft targets of :func:`layout_matching_loss`)."""
    with torch.no_grad():
        return torch.cat([x.float().softmax(-1) for x in planner.logits(teacher_seq)], dim=-1)


def reference_cells(model: M2ChatModel, batch: dict, reference_layout: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, 9]``: True at the cells where the layout planner reads an object in the reference picture's caption
    (the picture before: what an edit keeps, changes or moves away), False everywhere on a row without one.
    ``reference_layout``: that reading (:func:`layout_targets`) of the rows with a reference, when already made."""
    has_reference = batch["has_reference"].to(model.device)
    cells = torch.zeros(len(has_reference), GRID * GRID, dtype=torch.bool, device=model.device)
    if bool(has_reference.any()):
        layout = reference_layout if reference_layout is not None else reference_layouts(model, batch)
        cells[has_reference] = layout[..., :len(ATTRIBUTES["present"])].argmax(-1) == 1
    return cells


def reference_layouts(model: M2ChatModel, batch: dict, reference_seq: torch.Tensor | None = None) -> torch.Tensor:
    """The layout planner's reading (:func:`layout_targets`) of the reference pictures' captions, for the rows
    with a reference: cached by :func:`precompute_alignment`, or read from ``reference_seq`` (the teacher's
    sequences of those captions, :func:`reference_sequences` when not given)."""
    if "reference_layout" in batch:
        return batch["reference_layout"].to(model.device)[batch["has_reference"].to(model.device)]
    if reference_seq is None:
        reference_seq = reference_sequences(model, batch)
    return layout_targets(layout_of(model.unet), reference_seq.float())


def layout_matching_loss(planner, prompt_embeds: torch.Tensor, teacher_seq: torch.Tensor,
                         targets: torch.Tensor | None = None, cell_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The generator's layout planner, reading the adapter's ``prompt_embeds``, against what it reads from the
    teacher's sequence (soft targets, no labels): a cross-entropy for "is there an object" in each cell, and for
    each attribute one weighted by how sure the teacher's reading is that the cell holds an object. ``targets``:
    :func:`layout_targets` of ``teacher_seq`` when already computed (:func:`precompute_alignment` caches them).

    ``cell_weights`` ``[B, 9]`` (default: all equal): how much each cell counts against the others *of its row*. A
    row keeps its total weight, in each of the two parts (is there an object, its attributes), so weighing some
    cells more takes from the row's other cells, never from the other rows."""
    targets = layout_targets(planner, teacher_seq) if targets is None else targets
    target = targets.split([len(values) for values in ATTRIBUTES.values()], dim=-1)
    present, *attributes = planner.logits(prompt_embeds)
    here = target[0][..., 1]  # [B, 9]: how sure the teacher's reading is that each cell holds an object
    if cell_weights is None:
        present_weights, attribute_weights = torch.ones_like(here), here
    else:
        cell_weights = cell_weights.to(here.dtype)
        present_weights = cell_weights / cell_weights.mean(1, keepdim=True)
        attribute_weights = here * cell_weights
        attribute_weights = attribute_weights * here.sum(1, keepdim=True) / attribute_weights.sum(1, keepdim=True
                                                                                                 ).clamp_min(1e-6)
    per_cell = F.cross_entropy(present.flatten(0, 1).float(), target[0].flatten(0, 1), reduction="none")
    loss = (present_weights.flatten() * per_cell).mean()
    for logits, probs in zip(attributes, target[1:]):
        per_cell = F.cross_entropy(logits.flatten(0, 1).float(), probs.flatten(0, 1), reduction="none")
        loss = loss + (attribute_weights.flatten() * per_cell).sum() / here.sum().clamp_min(1e-6)
    return loss


def stage2_samples(n: int, seed: int = 0, split: str = "train",
                   mix: dict[str, float] | None = None, image_size: int = 32) -> list[Sample]:
    """Stage 2's data: stories, dialogues and visual questions (shares from ``mix``), shuffled."""
    mix = mix or {"story": 0.35, "dialogue": 0.35, "vqa": 0.3}
    samples = []
    for task, share in mix.items():
        samples += make_samples(task, max(1, round(n * share)), seed=seed, split=split, image_size=image_size)
    random.Random(f"stage2-{seed}").shuffle(samples)
    return samples


def stage2_loss(model: M2ChatModel, batch: dict, per_conversation: bool = False) -> torch.Tensor:
    """The LM's loss on the assistant's tokens (words and ``[IMG]`` spans), pictures in context: the mean over
    the batch's tokens, or with ``per_conversation`` over its conversations of each one's mean (``fusion.shifted_loss``)."""
    return fusion_loss(model.fused, batch, per_sequence=per_conversation)


def frozen_copy(fused: FusedLM) -> FusedLM:
    """A frozen copy of ``fused`` as it is now, in eval mode: the teacher of :func:`retention_loss` (a second
    LM and vision encoder in memory, with no gradients or optimizer state)."""
    return copy.deepcopy(fused).requires_grad_(False).eval()


def lora_weights(fused: FusedLM) -> dict[str, torch.Tensor]:
    """A copy of the LoRA's weights of ``fused`` as they are now (the start of :func:`interpolate_lora`)."""
    return {name: param.detach().clone() for name, param in fused.named_parameters() if "lora_" in name}


@torch.no_grad()
def interpolate_lora(fused: FusedLM, start: dict[str, torch.Tensor], keep: float) -> None:
    """Weight-space ensembling (WiSE-FT: Wortsman et al., "Robust fine-tuning of zero-shot models", 2022) of the
    LoRA alone: each LoRA weight becomes ``start + keep · (now − start)``, ``start`` being :func:`lora_weights`
    taken before stage 2 (prompt fusion's). ``keep`` 1 changes nothing, 0 gives back fusion's LoRA. Stage 2
    learns stories and dialogues in the same LoRA that answers visual questions, and drifts the answers: on the
    shipped stage 2, ``keep`` 0.7 answered 97.7% of the test questions against 96.7% (fusion: 99.0%), and four
    stage-2 runs gained 0.4 to 2.4 points. What it costs is the stories the system writes: at 0.7 every one of 20
    came out three frames long (as trained, one to six, most four), so the recipe keeps 1
    (``benchmarks/M2CHAT_RECIPE.md``, "Stage 2's LoRA, part of the way back to fusion's"). The projector and the
    gate keep what stage 2 made of them: put back, the answers to "how many" fell from 100% to 73%."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be between 0 and 1 (1: stage 2's LoRA as trained), got {keep!r}")
    for name, param in _lora_like(fused, start).items():
        param.copy_(torch.lerp(start[name].to(param), param, keep))


def _lora_like(fused: FusedLM, start: dict[str, torch.Tensor]) -> dict[str, torch.nn.Parameter]:
    """The LoRA weights of ``fused`` by name, checked to be the ones ``start`` holds (:func:`lora_weights`)."""
    params = {name: param for name, param in fused.named_parameters() if "lora_" in name}
    if set(params) != set(start):
        raise ValueError(f"start and the model's LoRA do not match (first: {sorted(set(start) ^ set(params))[0]}); "
                         "take start with lora_weights(fused) on the same model")
    return params


def lora_drift(fused: FusedLM, start: dict[str, torch.Tensor]) -> torch.Tensor:
    """How far the LoRA of ``fused`` has moved from ``start`` (:func:`lora_weights`, taken before stage 2): the
    squared distance Σ‖p − p₀‖² over its weights, differentiable. Stage 2's L2-SP term (Li et al., "Explicit
    inductive bias for transfer learning with convolutional networks", 2018): where :func:`interpolate_lora`
    moves the LoRA back once it is trained, this pulls it toward the start at every step, so stage 2 learns
    stories and dialogues in the directions that cost the visual questions least."""
    return sum(((param - start[name].to(param)) ** 2).sum() for name, param in _lora_like(fused, start).items())


def retention_loss(model: M2ChatModel, teacher: FusedLM, batch: dict) -> torch.Tensor:
    """How far the LM has moved from ``teacher`` (a :func:`frozen_copy` of prompt fusion, taken where stage 2
    starts) on the assistant's tokens of ``batch``: KL(teacher ‖ model) between their next-token distributions,
    the mean over those tokens. On visual questions it asks stage 2 to keep answering as fusion did, the whole
    distribution and not only its top word (``benchmarks/M2CHAT_RECIPE.md``, "A stage 2 that keeps fusion's
    answers")."""
    logits = batch_logits(model.fused, batch)[:, :-1]
    with torch.no_grad():
        target = batch_logits(teacher, batch)[:, :-1]
    here = batch["labels"][:, 1:].to(logits.device) != IGNORE_INDEX
    return F.kl_div(logits[here].float().log_softmax(-1), target[here].float().log_softmax(-1), log_target=True,
                    reduction="batchmean")


def stage2_objective(model: M2ChatModel, instruction: dict, aligned: dict | None = None,
                     alignment_weight: float = 1.0, lambda_seq: float = 1.0, lambda_pooled: float = 1.0,
                     diffusion_rows: int | None = None,
                     per_conversation: bool = False, retained: dict | None = None, teacher: FusedLM | None = None,
                     retention_weight: float = 0.0, anchor: dict[str, torch.Tensor] | None = None,
                     anchor_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """What a stage-2 step minimises: :func:`stage2_loss` on an ``instruction`` batch, plus
    ``alignment_weight`` × :func:`stage1_loss` on an ``aligned`` batch (:func:`alignment_batch`), plus
    ``retention_weight`` × :func:`retention_loss` to ``teacher`` on a ``retained`` batch (visual questions), plus
    ``anchor_weight`` × :func:`lora_drift` from ``anchor`` (L2-SP: the LoRA's distance from fusion's). The
    adapter is frozen in stage 2, so the second term only moves the LoRA: it keeps the states the adapter reads.
    That term is :func:`stage1_loss` with its defaults (teacher matching, diffusion and layout), without the recipe's
    reference terms and cell weights: with them, two stage-2 seeds kept no more of the untouched objects an edit
    leaves (89.9 and 93.5%) and stage 2 took 10% longer (``benchmarks/M2CHAT_RECIPE.md``, "Stage 2's seed decides
    which bar it meets")."""
    l_lm = stage2_loss(model, instruction, per_conversation)
    loss, parts = l_lm, {"lm": l_lm.item()}
    if aligned is not None and alignment_weight:
        l_aligned, aligned_parts = stage1_loss(model, aligned, lambda_seq, lambda_pooled,
                                               diffusion_rows=diffusion_rows)
        loss = loss + alignment_weight * l_aligned
        parts.update(alignment=l_aligned.item(), seq_mse=aligned_parts["seq_mse"])
    if retained is not None and retention_weight:
        if teacher is None:
            raise ValueError("retention_weight needs the teacher it keeps to: pass teacher=frozen_copy(model.fused), "
                             "taken before stage 2 trains")
        l_retained = retention_loss(model, teacher, retained)
        loss = loss + retention_weight * l_retained
        parts["retention"] = l_retained.item()
    if anchor_weight:
        if anchor is None:
            raise ValueError("anchor_weight needs the LoRA it pulls toward: pass anchor=lora_weights(model.fused), "
                             "taken before stage 2 trains")
        drift = lora_drift(model.fused, anchor)
        loss = loss + anchor_weight * drift
        parts["anchor_drift"] = drift.item()
    return loss, parts


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train_stage1(model: M2ChatModel, tokenizer, train_config: TrainConfig, batch_size: int = 32,
                 pool_size: int = 6000, lambda_seq: float = 1.0, lambda_pooled: float = 1.0, out_dir=None,
                 device: str = "cpu", progress: bool = True,
                 examples: Sequence[AlignmentExample] | None = None, diffusion_rows: int | None = None,
                 cached_steps: int = 0, lambda_layout: float = 1.0, words_from_step: int = 0,
                 lambda_reference: float = 0.0, words_lr_ratio: float | None = None, drawn_references: float = 0.0,
                 generator=None, drawing_steps: int = 4, drawing_guidance: float = 1.0,
                 drawing_cpu_bf16: bool = False, caching_cpu_bf16: bool = False,
                 tasks: Sequence[str] | dict[str, float] | None = None,
                 lambda_reference_layout: float = 0.0, reference_cells_weight: float = 0.0) -> TrainResult:
    """Stage 1 with the shared loop: adapter and ``[IMG]`` embeddings learn, all else is frozen. The data
    is ``pool_size`` ShapeWorld examples (from ``tasks``, as :func:`alignment_examples`; default: its own),
    or ``examples`` (real data: ``examples_of`` each sample);
    ``diffusion_rows`` and the λs as in :func:`stage1_loss`.

    The first ``cached_steps`` steps train the adapter alone: the ``[IMG]`` embeddings wait, so the LM, the
    vision encoder and the teacher are fixed functions of the example there, computed once for the whole
    pool (:func:`precompute_alignment`) instead of at every step. Those steps see the same batches and give
    the same losses as the plain loop would with the ``[IMG]`` embeddings held still; they skip the LM's
    forward and backward passes, the costliest part of a step. The steps after them train both groups.

    An adapter whose visual branch reads the words too (``AdapterConfig.visual_reads_words``) has them hidden
    from that branch before step ``words_from_step``: it first learns to read the picture alone, then where in
    the picture the words point (trained that way from the first step it fits worse and edits fewer pictures
    right: ``benchmarks/M2CHAT_RECIPE.md``, "The visual branch reads the words"). With ``words_lr_ratio`` the
    learning rate starts again where the words open: a warm restart (``TrainConfig.restart_step``) peaking at
    that fraction of ``lr``, so the converged adapter learns the new way in gently (opened on one schedule,
    the words kept fewer untouched objects: "The warm start joins the recipe").

    ``drawn_references`` (a share, 0 to 1): that share of the references the assistant drew are redrawn by the
    frozen ``generator`` (the tiny generator's pipeline) with ``drawing_steps`` sampling steps,
    ``drawing_guidance`` and ``drawing_cpu_bf16`` (:func:`draw_references`), so the adapter learns to read
    pictures like its own. ``caching_cpu_bf16``: the cached steps' inputs are computed in a bfloat16 autocast where
    the CPU has bfloat16 instructions (:func:`precompute_alignment`'s ``cpu_bf16``)."""
    if cached_steps < 0 or words_from_step < 0:
        raise ValueError(f"cached_steps and words_from_step must be 0 or more; got {cached_steps}, {words_from_step}")
    if words_lr_ratio is not None and words_from_step:
        train_config = dataclasses.replace(train_config, restart_step=words_from_step, restart_lr_ratio=words_lr_ratio)
    set_stage(model, "stage1")
    model.to(device)
    if drawn_references and generator is None:
        raise ValueError("drawn_references needs the frozen generator that draws them: pass generator= (the "
                         "TinyDiffusionPipeline the system was built with), or drawn_references=0")
    examples = list(examples) if examples is not None else \
        alignment_examples(pool_size, seed=train_config.seed, image_size=model.image_size, tasks=tasks)
    if drawn_references:
        examples = draw_references(examples, generator, drawn_references, seed=train_config.seed,
                                   num_inference_steps=drawing_steps, guidance_scale=drawing_guidance,
                                   progress=progress, cpu_bf16=drawing_cpu_bf16)
    full_batch = _alignment_batches(model, tokenizer, examples, batch_size, train_config.seed, pool_size)
    make_batch = full_batch
    if cached_steps:
        # make_batch's index counts micro-batches: grad_accum_steps per process and step (training's docstring)
        cached_batch, per_step = None, train_config.grad_accum_steps * data_parallel()[1]

        def make_batch(index: int) -> dict:
            nonlocal cached_batch
            if index >= cached_steps * per_step:
                return full_batch(index)
            if cached_batch is None:  # first needed here, so a run resumed after the cached steps skips it
                inputs = precompute_alignment(model, tokenizer, examples, progress=progress,
                                              cpu_bf16=caching_cpu_bf16)
                cached_batch = cached_batches(len(inputs), batch_size, train_config.seed, inputs.__getitem__,
                                              collate_precomputed)
            return cached_batch(index)
    if words_from_step:
        plain_batch, micro_per_step = make_batch, train_config.grad_accum_steps * data_parallel()[1]

        def make_batch(index: int) -> dict:  # the loop calls the loss on each batch right after making it
            model.adapter.words_closed = index < words_from_step * micro_per_step
            return plain_batch(index)
    last_parts: dict[str, float] = {}

    def loss_fn(batch: dict) -> torch.Tensor:
        loss, parts = stage1_loss(model, batch, lambda_seq, lambda_pooled, diffusion_rows=diffusion_rows,
                                  lambda_layout=lambda_layout, lambda_reference=lambda_reference,
                                  lambda_reference_layout=lambda_reference_layout,
                                  reference_cells_weight=reference_cells_weight)
        last_parts.update(parts)
        return loss

    try:
        with lora_merged(model.fused):  # the LoRA is frozen here: folded into the LM, the same function, faster
            return train(model, loss_fn, make_batch, train_config, out_dir=out_dir, device=device,
                         progress=progress, description="M³FT stage 1", log_extra=lambda: dict(last_parts))
    finally:
        model.adapter.words_closed = False


def train_stage2(model: M2ChatModel, tokenizer, train_config: TrainConfig, batch_size: int = 32,
                 pool_size: int = 6000, train_adapter_gate: bool = False, out_dir=None, device: str = "cpu",
                 progress: bool = True, samples: Sequence[Sample] | None = None, alignment_weight: float = 1.0,
                 alignment_batch_size: int | None = None, examples: Sequence[AlignmentExample] | None = None,
                 lambda_seq: float = 1.0, lambda_pooled: float = 1.0, diffusion_rows: int | None = None,
                 mix: dict[str, float] | None = None, per_conversation: bool = False,
                 alignment_tasks: Sequence[str] | dict[str, float] | None = None, retention_weight: float = 0.0,
                 retention_batch_size: int | None = None, lora_keep: float = 1.0,
                 anchor_weight: float = 0.0) -> TrainResult:
    """Stage 2 with the shared loop: LoRA, projector and fusion gate learn; the adapter is frozen. The data
    is ``pool_size`` ShapeWorld stories, dialogues and questions (shares from ``mix``, as
    :func:`stage2_samples`), or ``samples`` (real data). Each step adds
    ``alignment_weight`` × stage 1's loss on ``alignment_batch_size`` alignment examples (``batch_size // 2``
    by default): ShapeWorld's, or ``examples`` (default with ``samples``: the pictures they draw), with
    ``diffusion_rows`` as in :func:`stage1_loss` (ShapeWorld's drawn from ``alignment_tasks``, as
    :func:`alignment_examples`; pass stage 1's). ``per_conversation``: the LM loss weighs each conversation
    once (:func:`stage2_loss`), not each token, so a visual question's one-word answer counts as much as a story.

    ``retention_weight``: each step also adds that weight × :func:`retention_loss` on ``retention_batch_size``
    (``batch_size // 2`` by default) of the pool's visual questions, against a frozen copy of the fused LM as stage
    2 found it (prompt fusion's LoRA, projector and gate): stage 2 learns stories and dialogues while its answers
    stay close to fusion's.

    ``lora_keep`` (below 1): once trained, the LoRA is moved back toward fusion's, keeping that share of what stage
    2 changed (:func:`interpolate_lora`, WiSE-FT); the projector and gates stay as trained.

    ``anchor_weight`` (L2-SP): each step also adds that weight × the LoRA's squared distance from fusion's
    (:func:`lora_drift`), logged as ``anchor_drift``; 0 (off) changes nothing."""
    if not 0.0 <= lora_keep <= 1.0:
        raise ValueError(f"lora_keep must be between 0 and 1 (1: stage 2's LoRA as trained), got {lora_keep!r}")
    if not (anchor_weight >= 0.0 and math.isfinite(anchor_weight)):
        raise ValueError(f"anchor_weight must be 0 (off) or more, got {anchor_weight!r}")
    set_stage(model, "stage2", train_adapter_gate)
    model.to(device)
    if samples is not None and examples is None:  # real data: align on the pictures it draws
        examples = [example for sample in samples for example in examples_of(sample)]
        if alignment_weight and not examples:
            raise ValueError("stage 2's samples have no picture drawn by the assistant, so there is nothing to keep "
                             "aligned: pass alignment examples (examples=...) or alignment_weight=0")
    samples = list(samples) if samples is not None else \
        stage2_samples(pool_size, seed=train_config.seed, mix=mix, image_size=model.image_size)
    _check_pool(samples, batch_size, "samples")
    instruction_batch = sample_batches(tokenizer, samples, model.fused.tokens_per_image, batch_size,
                                       model.image_size, seed=train_config.seed)
    alignment = None
    if alignment_weight:
        alignment = _alignment_batches(model, tokenizer, examples, alignment_batch_size or max(1, batch_size // 2),
                                       train_config.seed, pool_size, alignment_tasks)
    retention, teacher = None, None
    if retention_weight:
        questions = [sample for sample in samples if sample.task == "vqa"]
        retention_batch_size = retention_batch_size or max(1, batch_size // 2)
        _check_pool(questions, retention_batch_size, "visual questions to keep fusion's answers on")
        retention = sample_batches(tokenizer, questions, model.fused.tokens_per_image, retention_batch_size,
                                   model.image_size, seed=train_config.seed + 1)
        teacher = frozen_copy(model.fused)  # before any step, and before a resumed run loads its state
    # fusion's LoRA, as the teacher is: before any step, and before a resumed run loads its state
    start = lora_weights(model.fused) if lora_keep < 1 or anchor_weight else None
    last_parts: dict[str, float] = {}

    def make_batch(step: int) -> tuple[dict, dict | None, dict | None]:
        return (instruction_batch(step), alignment(step) if alignment is not None else None,
                retention(step) if retention is not None else None)

    def loss_fn(batch: tuple[dict, dict | None, dict | None]) -> torch.Tensor:
        instruction, aligned, retained = batch
        loss, parts = stage2_objective(model, instruction, aligned, alignment_weight, lambda_seq, lambda_pooled,
                                       diffusion_rows, per_conversation, retained=retained, teacher=teacher,
                                       retention_weight=retention_weight, anchor=start, anchor_weight=anchor_weight)
        last_parts.update(parts)
        return loss

    result = train(model, loss_fn, make_batch, train_config, out_dir=out_dir, device=device, progress=progress,
                   description="M³FT stage 2", log_extra=lambda: {"fusion_gate": model.fused.gate_value(), **last_parts})
    if start is not None:
        interpolate_lora(model.fused, start, lora_keep)
    return result


def _alignment_batches(model: M2ChatModel, tokenizer, examples: Sequence[AlignmentExample] | None, batch_size: int,
                       seed: int, pool_size: int, tasks: Sequence[str] | dict[str, float] | None = None):
    """``make_batch(step)`` for stage 1's loss: ``batch_size`` of ``examples`` (default: ``pool_size``
    ShapeWorld alignment examples from ``tasks``), drawn afresh for every step from ``seed``."""
    examples = list(examples) if examples is not None else \
        alignment_examples(pool_size, seed=seed, image_size=model.image_size, tasks=tasks)
    _check_pool(examples, batch_size, "alignment examples")
    return cached_batches(len(examples), batch_size, seed, lambda i: encode_alignment(model, tokenizer, examples[i]),
                          lambda items: collate_alignment(items, tokenizer.pad_token_id))


def _check_pool(pool: Sequence, batch_size: int, what: str) -> None:
    if len(pool) < batch_size:
        raise ValueError(f"{len(pool)} {what} for batches of {batch_size}: give more data or a smaller batch size")


def train_joint(model: M2ChatModel, tokenizer, train_config: TrainConfig, batch_size: int = 32,
                pool_size: int = 6000, lambda_seq: float = 1.0, lambda_pooled: float = 1.0, out_dir=None,
                device: str = "cpu", progress: bool = True) -> TrainResult:
    """The ablation of the two stages: both groups train at once; each step adds stage 1's loss on an
    alignment batch and stage 2's loss on an instruction batch (so a joint step costs about one step of
    each stage and sees one batch of each)."""
    set_stage(model, JOINT)
    model.to(device)
    alignment = _alignment_batches(model, tokenizer, None, batch_size, train_config.seed, pool_size)
    samples = stage2_samples(pool_size, seed=train_config.seed, image_size=model.image_size)
    instruction_batch = sample_batches(tokenizer, samples, model.fused.tokens_per_image, batch_size,
                                       model.image_size, seed=train_config.seed)
    last_parts: dict[str, float] = {}

    def make_batch(step: int) -> tuple[dict, dict]:
        return alignment(step), instruction_batch(step)

    def loss_fn(batch: tuple[dict, dict]) -> torch.Tensor:
        alignment, instruction = batch
        l_stage1, parts = stage1_loss(model, alignment, lambda_seq, lambda_pooled)
        l_stage2 = stage2_loss(model, instruction)
        last_parts.update(parts, stage1=l_stage1.item(), stage2=l_stage2.item())
        return l_stage1 + l_stage2

    return train(model, loss_fn, make_batch, train_config, out_dir=out_dir, device=device, progress=progress,
                 description="M³FT joint (ablation)", log_extra=lambda: dict(last_parts))


# ---------------------------------------------------------------------------------------------
# Measuring stage 2: the written parts, teacher-forced
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_forced_scores(fused: FusedLM, tokenizer, samples: Sequence[Sample], batch_size: int = 32,
                          image_size: int = 32) -> dict:
    """How well the LM predicts the assistant's tokens of ``samples`` given everything before each one
    (pictures in context): ``loss`` (mean cross-entropy, nats), ``perplexity``, ``token_accuracy`` (the
    greedy choice is the next token), and for pictures, ``img_recall`` (where the assistant draws, the LM
    chooses ``[IMG0]``) and ``img_precision`` (where the LM chooses ``[IMG0]``, the assistant draws)."""
    if not samples:
        raise ValueError("teacher_forced_scores needs at least one sample")
    was_training = fused.training
    fused.eval()
    img0 = int(fused.gen_token_ids[0])
    nats, tokens, right, hits, targets, chosen = 0.0, 0, 0, 0, 0, 0
    for start in range(0, len(samples), batch_size):
        items = [encode_with_pictures(tokenizer, s, fused.tokens_per_image, image_size)
                 for s in samples[start:start + batch_size]]
        batch = collate(items, tokenizer.pad_token_id)
        logits = batch_logits(fused, batch)[:, :-1].float()
        labels = batch["labels"][:, 1:].to(logits.device)
        keep = labels != -100
        nats += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
        predicted = logits.argmax(-1)
        tokens += int(keep.sum())
        right += int((predicted == labels)[keep].sum())
        hits += int(((predicted == img0) & (labels == img0)).sum())
        targets += int((labels == img0).sum())
        chosen += int(((predicted == img0) & keep).sum())
    fused.train(was_training)
    loss = nats / tokens
    return {"loss": loss, "perplexity": float(torch.tensor(loss).exp()), "token_accuracy": right / tokens,
            "img_recall": hits / max(1, targets), "img_precision": hits / max(1, chosen), "n": len(samples),
            "tokens": tokens}


def stage2_metrics(model: M2ChatModel, tokenizer, pipeline=None, split: str = "test") -> dict:
    """What stage 2 is for, on the frozen benchmark: visual questions (exact answers) and the assistant's
    side of stories and dialogues, teacher-forced (:func:`teacher_forced_scores`)."""
    from .benchmark import load_benchmark
    from .fusion import vqa_accuracy

    metrics = {"vqa": {k: v for k, v in vqa_accuracy(model.fused, tokenizer, load_benchmark("vqa", split=split)).items()
                       if k != "replies"}}
    for task in ("story", "dialogue"):
        metrics[task] = teacher_forced_scores(model.fused, tokenizer, load_benchmark(task, split=split))
    metrics["fusion_gate"] = model.fused.gate_value()
    return metrics


# ---------------------------------------------------------------------------------------------
# Measuring stage 1: LM -> adapter -> generator, against the teacher text encoder
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def caption_conditions(model: M2ChatModel, tokenizer, samples: Sequence[Sample], batch_size: int = 50
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's ``(prompt_embeds, pooled)`` for caption samples: the user's caption, then the
    assistant's ``[IMG0..K-1]`` span given (teacher-forced), the LM's hidden states through the adapter."""
    was_training = model.training
    model.eval()
    embeds, pooled = [], []
    examples = [example for s in samples for example in examples_of(s)]
    for start in range(0, len(examples), batch_size):
        out = model.condition(alignment_batch(model, tokenizer, examples[start:start + batch_size]))
        embeds.append(out.prompt_embeds)
        pooled.append(out.pooled)
    model.train(was_training)
    return torch.cat(embeds), torch.cat(pooled)


def evaluate_alignment(model: M2ChatModel, tokenizer, pipeline, samples: Sequence[Sample], seed: int = 0,
                       batch_size: int = 50, return_images: bool = False, **kwargs) -> dict:
    """Oracle scores of the pictures drawn from the LM through the adapter for benchmark caption samples,
    in the same format as ``diffusion.evaluate_generator`` (the teacher row), from the same noise."""
    samples = check_caption_samples(samples)
    start = time.perf_counter()
    embeds, pooled = caption_conditions(model, tokenizer, samples, batch_size)
    images = generate_for_embeds(pipeline, embeds, pooled, seed=seed, batch_size=batch_size, **kwargs)
    return score_pictures(samples, images, time.perf_counter() - start, return_images)


# ---------------------------------------------------------------------------------------------
# Saving and loading the trained system
# ---------------------------------------------------------------------------------------------

SYSTEM_FILE = "m2chat.json"


def reference_system_dir(name: str = "stage1", preset: str = "tiny") -> Path:
    """Where a shipped system lives: ``data/checkpoints/<preset>/<name>`` (``stage1``: after M³FT stage 1)."""
    return DATA_DIR / "checkpoints" / preset / name


def save_system(model: M2ChatModel, folder, record: dict | None = None, lm_dir: str = "../../lm",
                clip_dir: str = "../../clip", diffusion_dir: str = "../diffusion", adapter_dir: str | None = None,
                adapter_dtype: torch.dtype | None = None, extra=None) -> Path:
    """Write ``folder/fused`` (``fusion.save_fused``), ``folder/adapter`` (the adapter's own folder) and
    ``folder/m2chat.json`` (where the shared LM, CLIP and generator folders are, relative to ``folder``, and
    ``record``: how it was trained), all or nothing.

    ``adapter_dir`` (relative to ``folder``) points at an adapter saved elsewhere instead of writing one:
    stage 2 does not change the adapter, so the stage-2 system shares stage 1's. ``adapter_dtype`` stores
    the adapter's weights in that type (``torch.float16`` for the shipped one). ``extra(tmp)`` may add more
    to the folder before it moves into place."""
    def write(tmp: Path) -> None:
        save_fused(model.fused, tmp / "fused", lm_dir=lm_dir, clip_dir=clip_dir)
        if adapter_dir is None:
            model.adapter.save_pretrained(tmp / "adapter", dtype=adapter_dtype)
        meta = {"diffusion_dir": diffusion_dir, "adapter_dir": adapter_dir or "adapter",
                "context_tokens": model.context_tokens, "visual_layer": model.visual_layer,
                "lm_layers": list(model.lm_layers), "normalize_layers": model.normalize_layers,
                "record": record or {}}
        (tmp / SYSTEM_FILE).write_text(json.dumps(meta, indent=2))
        if extra is not None:
            extra(tmp)
    return save_folder(folder, write)


def load_system(folder, device: str = "cpu"):
    """``(model, tokenizer, pipeline)`` from a folder written by :func:`save_system`."""
    from .diffusion import TinyDiffusionPipeline

    folder = Path(folder)
    if not (folder / SYSTEM_FILE).is_file():
        raise FileNotFoundError(f"no M²Chat system in {folder} ({SYSTEM_FILE} is missing); train one with "
                                "`m2chat-lite train --preset tiny --stage stage1` or save it with save_system")
    from . import hf

    if (folder / hf.HF_FILE).is_file():  # an hf-small system: its frozen parts are checkpoints, not folders here
        return hf.load_system(folder, device=device)
    try:
        meta = json.loads((folder / SYSTEM_FILE).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{folder / SYSTEM_FILE} is not valid JSON ({error}); save the system again") from error
    fused, tokenizer = load_fused(folder / "fused", device=device)
    diffusion_dir = (folder / meta["diffusion_dir"]).resolve()
    pipeline = TinyDiffusionPipeline.from_pretrained(diffusion_dir, device=device)
    fused_config = json.loads((folder / "fused" / "fusion_config.json").read_text())
    # where the frozen parts came from (M2ChatPipeline.save_pretrained copies them)
    source = {"lm": (folder / "fused" / fused_config["lm_dir"]).resolve(),
              "clip": (folder / "fused" / fused_config["clip_dir"]).resolve(), "diffusion": diffusion_dir}
    return assemble_system(folder, meta, fused, pipeline, source, device), tokenizer, pipeline


def assemble_system(folder: Path, meta: dict, fused: FusedLM, generator, source: dict, device: str) -> M2ChatModel:
    """The :class:`M2ChatModel` of a saved system (``meta``: its ``m2chat.json``) around its loaded ``fused``
    LM and ``generator``: the adapter from the folder, the generator's frozen pieces, where the frozen parts
    came from (``source``) and how it was trained. Shared by this module's and ``hf``'s ``load_system``."""
    adapter = M3Adapter.from_pretrained(folder / meta.get("adapter_dir", "adapter"), device=device)
    model = M2ChatModel(fused, adapter, generator.unet, generator.training_scheduler(), generator.text_encoder,
                        generator.tokenizer, meta["context_tokens"], meta["visual_layer"], meta["lm_layers"],
                        vae=getattr(generator, "vae", None), image_size=generator.image_size,
                        normalize_layers=meta.get("normalize_layers", False))
    model.source, model.record = source, meta.get("record", {})
    return model.to(device).eval()
