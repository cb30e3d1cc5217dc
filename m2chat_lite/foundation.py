"""The reference recipe for the tiny foundation models: tokenizer, CLIP, language model, generator.

Run by ``m2chat-lite train --preset tiny --stage clip|lm|diffusion|foundation [--out DIR]``; the shipped
reference checkpoints in ``data/checkpoints/tiny/`` were made by ``m2chat-lite train --preset tiny --stage S
--threads 2 --out data/checkpoints/tiny``, stage by stage (each stage is deterministic on its thread count, and
another count trains another model). Notebooks 02–04 train each model briefly, then load these folders
to show what the full recipe gives.

Each stage writes ``DIR/<stage>/`` (a ``save_pretrained`` folder with its tokenizer) and records in
``DIR/manifest.json`` the exact command, package version, seed, steps, wall time, machine and metrics.
Training state lives in ``DIR/.state/<stage>/`` while a stage runs, so an interrupted run resumes where
it stopped; it is deleted when the stage finishes.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import __version__
from .benchmark import load_benchmark
from .config import M2ChatConfig, get_config
from .data import image_to_tensor
from .training import TrainConfig, data_parallel, wait_for_everyone
from .utils import DATA_DIR, atomic_write_json, get_device, set_seed

STAGES = ("clip", "lm", "diffusion")  # the foundation models, in order
# M²Chat's own training on top of them, in order (each needs the ones before in the same folder); "all" runs these
M2CHAT_STAGES = ("fusion", "stage1", "stage2")
REFERENCE_DIR = DATA_DIR / "checkpoints" / "tiny"

# The reference budgets (optimizer steps) and settings; `steps` on the command line scales nothing else.
RECIPE = {
    # The CLIP's lr: at 2e-3 the text states of the CLIP the CLI trained on 2 threads said poorly where an object is
    # (a probe read one object's cell from its pooled embedding 74.7% of the time), and the layout planner stalled on
    # it unless it re-read the caption (~5 minutes more); at 1e-3 the same recipe gives a CLIP whose plain planner
    # names 100% of one- and two-object test scenes, on 1 thread and on 2 (benchmarks/DIFFUSION_RECIPE.md, "A calmer
    # CLIP")
    "clip": {"steps": 2000, "batch_size": 64, "lr": 1e-3, "warmup_steps": 50, "weight_decay": 0.05,
             "moved_fraction": 0.25, "reshaped_fraction": 0.25},
    # The LM: 800 steps of 20 packed 256-token rows at lr 4e-3, in float32. The recipe before (8 rows at 4e-3) came
    # within 2% of the grammar's caption entropy, yet restated 11% of the benchmark's requests for a picture ("here
    # is <the scene asked for>"), so the system drew what it said, not what was asked; at 20 rows in a bfloat16
    # autocast it needed lr 1.6e-2 to restate them all (benchmarks/M2CHAT_RECIPE.md, "In its own words" and "An LM
    # that restates"). In float32 lr 4e-3 restates 100% of the test requests with a lower loss, and prompt fusion
    # on it answers more: bfloat16 had bought the LM no time on the AMD EPYC (M2CHAT_RECIPE.md, "The LM's recipe,
    # separated")
    "lm": {"steps": 800, "lr": 4e-3, "warmup_steps": 50, "weight_decay": 0.01, "rows": 20, "n_per_task": 5000,
           "cpu_bf16": False},
    # `cpu_bf16`: a bfloat16 autocast on CPUs with bfloat16 matrix units (utils.cpu_has_bf16): the UNet's step
    # takes a quarter less time there (benchmarks/DIFFUSION_RECIPE.md, "Fitting 20 minutes"); the CLIP's gets slower.
    # `planner`: the layout planner (m2chat_lite.layout), trained first on the CLIP's token states and frozen; the
    # UNet reads its map of each caption (benchmarks/DIFFUSION_RECIPE.md, "The layout planner"). `reread_blocks`: 0,
    # the planner reads the CLIP's states as they are; the recipe's CLIP before (lr 2e-3) needed two re-reading layers
    # (DIFFUSION_RECIPE.md, "When the planner stalls" and "A calmer CLIP"). The UNet: 700 steps on 1-3 object pictures from the
    # first (`single_object_steps` 0): with the planner's map it draws the test captions that 1,400 steps with a
    # one-object curriculum drew but one (a 400-step UNet lost two- and three-object captions; DIFFUSION_RECIPE.md,
    # "Half the UNet's steps")
    "diffusion": {"steps": 700, "lr": 2e-3, "warmup_steps": 100, "weight_decay": 0.0, "ema_decay": 0.995,
                  "cpu_bf16": True, "single_object_steps": 0,
                  "planner": {"steps": 2000, "lr": 2e-3, "warmup_steps": 100, "batch_size": 256, "pool_size": 40_000,
                              "reread_blocks": 0}},
    # `rehearsal_rows`: each step also rehearses the LM's own pretraining pool, that many packed rows, so the LoRA
    # does not unlearn the LM's longer replies (fusion.train_fusion; benchmarks/M2CHAT_RECIPE.md, "Fusion rehearses
    # the LM's words")
    "fusion": {"steps": 3000, "lr": 3e-3, "warmup_steps": 50, "weight_decay": 0.0, "batch_size": 128,
               "tokens_per_image": 9, "lora_rank": 16, "pool_last": True, "pool_size": 20_000, "rehearsal_rows": 4},
    # M³FT. `diffusion_rows`: how many rows of each batch the diffusion term sees (None: all; 0: none).
    # `cached_steps`: stage 1's first steps train the adapter alone on the frozen parts' outputs, computed once
    # (m3ft.train_stage1); the last 15 train the [IMG] embeddings too (benchmarks/M2CHAT_RECIPE.md, "Fitting 15
    # minutes"; 50 before "A GPU search": the adapter trained on the GPU with 25 drew the same test captions, and
    # a plain step costs about seven cached ones; 25 before "A faster M³FT"). `caching_cpu_bf16`: the cache of
    # what the adapter reads is computed in a bfloat16 autocast where the CPU has bfloat16 instructions (m3ft.
    # precompute_alignment; a quarter to a third less time, the teacher's targets stay float32). `diffusion_rows`
    # 1 (was 4): the diffusion term's pass through the UNet costs about 30 ms a step whatever the rows, 10 ms per
    # row; on one row its expectation is the same, and a cached step takes 12% less time. `drawing_steps` 3 (was 4).
    # Stage 2: `alignment_batch_size` 8 (was 16), 280 steps (was 300). Together both stages went from 1,053 s to
    # 867 s on the same AMD EPYC; three runs of the recipe (two seeds) scored within the scatter of the two runs
    # before (means: edits done 91.0 against 90.0%, kept 87.1 against 86.3%, visual questions 81.4 against 82.2%;
    # M2CHAT_RECIPE.md, "A faster M³FT"). `--steps N` keeps the same share cached; `--minutes` runs plain
    # steps only. `visual_reads_words` / `words_from_step` / `words_lr_ratio`: the warm start. The adapter's visual
    # branch reads the LM's span too (AdapterConfig.visual_reads_words), hidden until `words_from_step`, where the
    # plain adapter has converged; there the learning rate starts again at a quarter of its peak (a warm restart,
    # TrainConfig.restart_step) and the last cached steps teach the branch where the words point. On one schedule,
    # with no restart, the words opened at step 900 or 1,000 kept fewer untouched objects (M2CHAT_RECIPE.md,
    # "A GPU search" and "The warm start joins the recipe").
    # Batch 128: two-object scenes reach the adapter only after about 150,000 examples seen (batch 32 saw 48,000
    # and carried 3% of them; benchmarks/M2CHAT_RECIPE.md, "Two objects through the adapter"). A pool of 12,000
    # (was 6,000, each example seen 27 times): in the same steps stage 1 draws 93.3% of the test captions right
    # (6,000: 85.0%); run longer on 6,000 (1,800 steps) its loss fell lower and 55.7% came out right, the mark of
    # a pool learnt by heart (benchmarks/M2CHAT_RECIPE.md, "A larger pool").
    # `lambda_reference`: the visual branch alone, through the adapter's output head, must also say the reference
    # picture's caption (m3ft.stage1_loss): fresh adapters kept 89.3% and 84.5% of the untouched objects of the test
    # dialogues' edits against 81.0% and 68.5% without it (two pairs on the same LM), edits done unchanged; 2% of a
    # cached step (benchmarks/M2CHAT_RECIPE.md, "The visual branch says what it sees"). `lambda_reference_layout`: the
    # same, in the layout planner's terms (m3ft.stage1_loss): read by the planner, the visual branch saw 98% of the
    # objects the test edits keep, against 85% with the MSE alone; after stage 2, untouched objects kept 90.5% against
    # 89.3%, in the system's own words 95.2% against 91.7%, for 7% more time per cached step (M2CHAT_RECIPE.md, "The
    # visual branch says what it sees, in the planner's terms"). `reference_cells_weight`: on a row with a picture
    # before, the output's layout term weighs the cells that picture fills 1 + 4 times the row's other cells, the row
    # keeping its total weight (m3ft.stage1_loss): at stage 1 the pictures kept 93.5% of what the test edits leave
    # alone against 88.6% (M2CHAT_RECIPE.md, "The fused output weighs the cells of the picture before").
    # `drawn_references`: the share of the references the assistant drew that the frozen generator redraws before
    # stage 1 (m3ft.draw_references), with `drawing_steps` and `drawing_guidance`, in a bfloat16 autocast where the
    # CPU has bfloat16 instructions (`drawing_cpu_bf16`: half the time, the same oracle scores). All of them, so
    # the adapter reads pictures like the system's own: untouched objects kept after stage 2 rose from 73.8% to
    # 84.5% (at stage 1, 75.0% -> 85.7%; with 1,600 cached steps 88.1%). The drawing (about 2 minutes on 2 cores
    # at 4 steps; 85 s at the 3 of "A faster M³FT") is paid for with 300 fewer cached steps (1,300, was 1,600;
    # the words open at 900, was 1,100)
    # (M2CHAT_RECIPE.md, "The picture before is the system's own" and "Drawn references join the recipe").
    # `steps`: the adapter underfits in this budget. 2,000 steps, or three cross-attention blocks per branch at 1,315,
    # drew 95.1% of what the test edits keep at stage 1 against 89.4% for the shipped run, but would cost an
    # estimated 170-280 s that the 15-minute bar does not have (M2CHAT_RECIPE.md, "Kept is set by stage 1's adapter").
    # Through stage 2 those stage 1s kept 93.5-94.6% in five runs, none 95% (M2CHAT_RECIPE.md, "More stage-1 compute
    # is not enough either").
    # `tasks`: the pool's shares of captions, stories and dialogues (m3ft.alignment_examples; was a third each). Half
    # from dialogues, whose edits are where untouched objects are lost; stage 2's alignment term draws from the same
    # shares (M2CHAT_RECIPE.md, "Half the alignment pool from dialogues")
    "stage1": {"steps": 1315, "lr": 2e-3, "warmup_steps": 50, "weight_decay": 0.0, "batch_size": 128,
               "pool_size": 12000, "gate_mode": "adaptive", "lambda_seq": 1.0, "lambda_pooled": 1.0,
               "lambda_reference": 1.0, "lambda_reference_layout": 1.0, "reference_cells_weight": 4.0,
               "diffusion_rows": 1, "cached_steps": 1300, "visual_reads_words": True, "words_from_step": 900,
               "words_lr_ratio": 0.25, "drawn_references": 1.0, "drawing_steps": 3, "drawing_guidance": 3.0,
               "drawing_cpu_bf16": True, "caching_cpu_bf16": True,
               "tasks": {"caption": 0.25, "story": 0.25, "dialogue": 0.5}},
    # `mix`: the shares of stories, dialogues and visual questions in stage 2's pool (m3ft.stage2_samples).
    # `per_conversation`: the LM loss weighs each conversation once, not each token (m3ft.stage2_loss). Weighed by
    # token, the visual questions, 30% of the conversations, were 2.8% of the loss, and stage 2 lost about 12 points
    # of prompt fusion's answers; weighed once each, on the same stage 1 they answered 82.7% against 71.7% (another
    # seed: 81.0% against 72.7%), the pictures and edits as before, the stories' words a little less sure (perplexity
    # 1.58-1.61 against 1.52-1.54) (benchmarks/M2CHAT_RECIPE.md, "Each conversation weighs once"). Visual
    # questions are 45% of the pool (was 30%): on the same stage 1, four runs answered 96.7-97.7% of the test
    # questions (mean 97.0%) against 93.7-94.0% at 30%, the stories still over their bars and the untouched objects
    # kept as before (M2CHAT_RECIPE.md, "More visual questions in stage 2"). `lora_keep`: once trained, the LoRA
    # keeps that share of what stage 2 changed and goes back the rest of the way to prompt fusion's
    # (m3ft.interpolate_lora, WiSE-FT). 1 (off) in the recipe: at 0.7 four stage-2 runs answered 97.7-98.3% of the
    # test questions against 95.3-97.3% as trained, and the stories and edits drawn from the benchmark's words were as
    # right, but the stories the system writes in its own words all came out three frames long (20 of the benchmark's
    # 20 requests; as trained 13 of 20 have four, one to six in all), at 0.85 19 of 20 (M2CHAT_RECIPE.md, "Stage 2's
    # LoRA, part of the way back to fusion's").
    # `retention_weight`: each step also pulls the answers to `retention_batch_size` of the pool's visual questions
    # toward prompt fusion's (m3ft.retention_loss, a KL to a frozen copy of the fused LM as stage 2 found it). Off: at
    # 10 two one-thread seeds answered 97.7% for replies less often word for word, and at 4 the CLI's 2-thread run
    # answered 96.7% in half as much time again (M2CHAT_RECIPE.md, "A stage 2 that keeps fusion's answers" and
    # "Stage 2's LoRA, part of the way back"). `lr`: at 1.5e-3 three seeds answered 99.0, 98.3 and 97.0% of the test
    # questions (the recipe's 95.3, 98.3 and 97.3%) but kept 90.5, 92.3 and 88.7% of the untouched objects (95.2, 91.7
    # and 90.5%); the seed alone moves both by up to 3-4 points (M2CHAT_RECIPE.md, "Stage 2's seed decides
    # which bar it meets"). `anchor_weight` (L2-SP): each step also adds that weight x the LoRA's squared distance from
    # prompt fusion's (m3ft.lora_drift), so stage 2 learns stories and dialogues where it costs the visual questions
    # least. From the shipped stage 1, seeds 0 and 1 (one thread): at 0.003 they answered 97.3 and 97.7% of the test
    # questions (the recipe without it: 95.3 and 98.3%) and kept 93.5 and 92.3% of the untouched objects (95.2 and
    # 91.7%), their own stories 3.9 frames long as the benchmark's are; at 0.01 98.0 and 98.0% but kept 92.3 and 89.3%,
    # own stories 3.7-3.8 frames; at 0.03 97.0 and 98.3%, kept 88.1 and 89.9%, own stories 3.2-3.5 frames. The
    # stronger the pull, the more of what stage 2 learns for the edits and the stories is held back
    # (M2CHAT_RECIPE.md, "Stage 2 pulled toward prompt fusion's LoRA")
    "stage2": {"steps": 280, "lr": 2e-3, "warmup_steps": 50, "weight_decay": 0.0, "batch_size": 32,
               "pool_size": 6000, "alignment_weight": 1.0, "alignment_batch_size": 8, "diffusion_rows": 0,
               "mix": {"story": 0.275, "dialogue": 0.275, "vqa": 0.45}, "per_conversation": True,
               "retention_weight": 0.0, "retention_batch_size": 16, "lora_keep": 1.0, "anchor_weight": 0.003},
}


def _train_config(stage: str, steps: int | None, minutes: float | None, seed: int,
                  grad_accum_steps: int = 1) -> TrainConfig:
    r = RECIPE[stage]
    return TrainConfig(max_steps=steps if steps is not None else (None if minutes else r["steps"]),
                       max_seconds=minutes * 60 if minutes else None, lr=r["lr"], warmup_steps=r["warmup_steps"],
                       weight_decay=r["weight_decay"], ema_decay=r.get("ema_decay"), seed=seed,
                       log_every=25, checkpoint_every=100, grad_accum_steps=grad_accum_steps,
                       cpu_bf16=r.get("cpu_bf16", False))


def stage1_cached_steps(steps: int | None, minutes: float | None) -> int:
    """Stage 1's cached steps for a budget: the recipe's share of ``--steps`` (so the last steps still train the
    ``[IMG]`` embeddings), none for ``--minutes`` (the budget's last steps are not known in advance)."""
    return _recipe_share("cached_steps", steps, minutes)


def stage1_words_from_step(steps: int | None, minutes: float | None) -> int:
    """The step from which stage 1's adapter reads the words in its visual branch, for a budget: the recipe's
    share of ``--steps``, as :func:`stage1_cached_steps`; 0 (from the start) for ``--minutes``."""
    return _recipe_share("words_from_step", steps, minutes) if RECIPE["stage1"]["visual_reads_words"] else 0


def stage1_recipe_kwargs(steps: int | None, minutes: float | None) -> dict:
    """The recipe's stage-1 knobs that depend on the budget, as keyword arguments of ``m3ft.train_stage1``: the
    diffusion term's rows, the reference terms' weights, the cached steps and where the visual branch's words open
    (with the warm restart there), the drawn references and the pool's task shares. The CLI stage and the
    ablations both call it, so they cannot drift apart."""
    r = RECIPE["stage1"]
    return {"diffusion_rows": r["diffusion_rows"], "lambda_reference": r["lambda_reference"],
            "lambda_reference_layout": r["lambda_reference_layout"], "reference_cells_weight": r["reference_cells_weight"],
            "cached_steps": stage1_cached_steps(steps, minutes),
            "words_from_step": stage1_words_from_step(steps, minutes), "words_lr_ratio": r["words_lr_ratio"],
            "drawn_references": r["drawn_references"], "drawing_steps": r["drawing_steps"],
            "drawing_guidance": r["drawing_guidance"], "drawing_cpu_bf16": r["drawing_cpu_bf16"],
            "caching_cpu_bf16": r["caching_cpu_bf16"], "tasks": r["tasks"]}


def _recipe_share(key: str, steps: int | None, minutes: float | None) -> int:
    r = RECIPE["stage1"]
    if steps is None:
        return 0 if minutes else r[key]
    return steps * r[key] // r["steps"]


def _benchmark_pictures(split: str, device: str):
    samples = load_benchmark("caption", split=split)
    pictures = torch.stack([image_to_tensor(s.images()[0].load()) for s in samples]).to(device)
    return pictures, [s.meta["caption"] for s in samples]


def clip_metrics(clip, tokenizer, device: str = "cpu") -> dict:
    from .encoders import clip_score, retrieval_accuracy

    metrics = {}
    for split in ("test", "heldout"):
        pictures, captions = _benchmark_pictures(split, device)
        r = retrieval_accuracy(clip, tokenizer, pictures, captions, n_candidates=100)
        metrics[split] = {"image_to_text_top1_of_100": r["image_to_text"], "text_to_image_top1_of_100": r["text_to_image"],
                          "clip_score": clip_score(clip, tokenizer, pictures, captions), "n": len(captions)}
    return metrics


@dataclass(frozen=True)
class StageRun:
    """What every stage's trainer gets: the budget, the seed, the device and where to write."""

    stage: str
    out_dir: Path
    config: M2ChatConfig
    train_config: TrainConfig
    steps: int | None
    minutes: float | None
    seed: int
    device: str
    progress: bool
    grad_accum_steps: int

    @property
    def state_dir(self) -> Path:
        """The stage's training state while it runs (resume from here; deleted when the stage is done)."""
        return self.out_dir / ".state" / self.stage


# Each stage's trainer trains (every process) and returns ``(result, finish)``: ``finish()``, called on process 0
# alone after the clock stops, saves the stage's folder and returns its metrics for the manifest.


def _train_clip_stage(run: StageRun):
    from .backbone import build_tokenizer
    from .encoders import save_clip, train_clip

    r = RECIPE["clip"]
    tokenizer = build_tokenizer(run.config)
    clip, result = train_clip(run.config, tokenizer, run.train_config, batch_size=r["batch_size"],
                              moved_fraction=r["moved_fraction"], reshaped_fraction=r["reshaped_fraction"],
                              out_dir=run.state_dir, device=run.device, progress=run.progress)

    def finish() -> dict:
        metrics = clip_metrics(clip, tokenizer, run.device)
        save_clip(clip, tokenizer, run.out_dir / "clip")
        return metrics

    return result, finish


def _train_lm_stage(run: StageRun):
    from .backbone import benchmark_perplexity, build_tokenizer, load_lm, restated_requests, save_lm, train_lm

    tokenizer = build_tokenizer(run.config)
    model, result = train_lm(run.config, tokenizer, run.train_config, out_dir=run.state_dir, device=run.device,
                             progress=run.progress, rows=RECIPE["lm"]["rows"], n_per_task=RECIPE["lm"]["n_per_task"])

    def finish() -> dict:
        # Shipped in float16 (half the bytes, as the generator); scored as shipped and in float32 beside it
        save_lm(model, tokenizer, run.out_dir / "lm", dtype=torch.float16)
        shipped, _ = load_lm(run.out_dir / "lm", device=run.device)
        return {"shipped (float16 weights)": benchmark_perplexity(shipped, tokenizer, split="test", device=run.device),
                "float32 weights": benchmark_perplexity(model, tokenizer, split="test", device=run.device),
                "requests restated (benchmark dialogues)": {
                    split: restated_requests(shipped, tokenizer, split=split)["exact"] for split in ("test", "heldout")}}

    return result, finish


def diffusion_recipe_settings() -> dict:
    """The :class:`~m2chat_lite.diffusion.DiffusionRecipe` settings the recipe's generator stage changes from the
    dataclass's defaults (also ``benchmarks/diffusion.py``'s default ``--recipe``)."""
    return {"layout_planner": True, "single_object_steps": RECIPE["diffusion"]["single_object_steps"]}


def _train_diffusion_stage(run: StageRun):
    from .diffusion import DiffusionRecipe, TinyDiffusionPipeline, evaluate_generator, train_diffusion
    from .encoders import load_clip

    clip, tokenizer = load_clip(run.out_dir / "clip", device=run.device)
    r, q = RECIPE["diffusion"], RECIPE["diffusion"]["planner"]
    # the planner first (its own state folder, so it resumes too); `--steps N` scales its budget with the UNet's
    planner_steps = q["steps"] if run.steps is None else max(1, run.steps * q["steps"] // r["steps"])
    planner, planned = train_reference_planner(run.config, clip, tokenizer, planner_steps, run.seed, run.device,
                                               run.state_dir / "planner", run.progress)
    pipeline, result = train_diffusion(run.config, clip, tokenizer, run.train_config, out_dir=run.state_dir,
                                       device=run.device, progress=run.progress,
                                       recipe=DiffusionRecipe(**diffusion_recipe_settings()), planner=planner)
    pipeline.defaults["planner"] = {**q, "steps": planned.steps}

    def finish() -> dict:
        # Shipped in float16 (half the bytes), sharing the CLIP folder beside it; scored as shipped and
        # in float32, so the manifest shows what half precision costs.
        pipeline.save_pretrained(run.out_dir / "diffusion", text_encoder_dir="../clip", dtype=torch.float16)
        shipped = TinyDiffusionPipeline.from_pretrained(run.out_dir / "diffusion", device=run.device)
        captions = load_benchmark("caption")
        return {"shipped (float16 weights)": _scores(evaluate_generator(shipped, captions)),
                "float32 weights": _scores(evaluate_generator(pipeline, captions)),
                "layout planner": layout_metrics(planner, clip, tokenizer, captions, run.device),
                "layout planner steps": planned.steps}

    return result, finish


def train_reference_planner(config: M2ChatConfig, clip, tokenizer, steps: int | None = None, seed: int = 0,
                            device: str = "cpu", out_dir=None, progress: bool = True):
    """The recipe's layout planner (``RECIPE["diffusion"]["planner"]``) on the frozen ``clip``, for ``steps``
    (default: the recipe's); a shorter run encodes no more captions than it can use. Returns ``(planner, result)``."""
    from .diffusion import DiffusionRecipe
    from .layout import train_planner

    q = RECIPE["diffusion"]["planner"]
    steps = q["steps"] if steps is None else steps
    train_config = TrainConfig(max_steps=steps, lr=q["lr"], warmup_steps=q["warmup_steps"], weight_decay=0.0,
                               seed=seed, log_every=25, checkpoint_every=500)
    return train_planner(config, clip, tokenizer, train_config, patch_size=DiffusionRecipe().patch_size,
                         batch_size=q["batch_size"], pool_size=min(q["pool_size"], steps * q["batch_size"]),
                         device=device, out_dir=out_dir, progress=progress, reread_blocks=q["reread_blocks"])


def layout_metrics(planner, clip, tokenizer, captions, device: str = "cpu") -> dict:
    """The share of benchmark captions whose nine cells the layout planner names all right, per split and
    object count."""
    from .diffusion import encode_prompts
    from .layout import planner_accuracy
    from .world.samples import scenes_of

    table = {}
    for split in ("test", "heldout"):
        chosen = [s for s in captions if s.meta.get("split", "test") == split]
        if chosen:
            embeds, _ = encode_prompts(clip, tokenizer, [s.meta["caption"] for s in chosen], device=device)
            table[split] = {k: round(v, 4) for k, v in
                            planner_accuracy(planner, embeds, [scenes_of(s)[0] for s in chosen]).items()}
    return table


def _train_fusion_stage(run: StageRun):
    from .backbone import load_lm
    from .encoders import load_clip
    from .fusion import build_fused_lm, save_fused, train_fusion, vqa_accuracy

    r = RECIPE["fusion"]
    lm, tokenizer = load_lm(run.out_dir / "lm", device=run.device)
    clip, _ = load_clip(run.out_dir / "clip", device=run.device)
    model = build_fused_lm(lm, clip, tokenizer, tokens_per_image=r["tokens_per_image"], lora_rank=r["lora_rank"],
                           seed=run.seed, pool_last=r.get("pool_last", False))
    result = train_fusion(model, tokenizer, run.train_config, batch_size=r["batch_size"], pool_size=r["pool_size"],
                          out_dir=run.state_dir, device=run.device, progress=run.progress,
                          rehearsal_rows=r["rehearsal_rows"], rehearsal_pool=RECIPE["lm"]["n_per_task"],
                          rehearsal_seq_len=run.config.max_seq_len)

    def finish() -> dict:
        metrics = {split: {k: v for k, v in vqa_accuracy(model, tokenizer, load_benchmark("vqa", split=split)).items()
                           if k != "replies"} for split in ("test", "heldout")}
        metrics["gate"] = model.gate_value()
        save_fused(model, run.out_dir / "fusion")
        return metrics

    return result, finish


def _train_stage1(run: StageRun):
    from .diffusion import TinyDiffusionPipeline, evaluate_generator
    from .fusion import load_fused
    from .m3ft import build_m2chat, evaluate_alignment, load_system, save_system, train_stage1

    r = RECIPE["stage1"]
    fused, tokenizer = load_fused(run.out_dir / "fusion", device=run.device)
    pipeline = TinyDiffusionPipeline.from_pretrained(run.out_dir / "diffusion", device=run.device)
    model = build_m2chat(fused, pipeline, run.config, gate_mode=r["gate_mode"], seed=run.seed,
                         visual_reads_words=r["visual_reads_words"])
    result = train_stage1(model, tokenizer, run.train_config, batch_size=r["batch_size"], pool_size=r["pool_size"],
                          lambda_seq=r["lambda_seq"], lambda_pooled=r["lambda_pooled"],
                          **stage1_recipe_kwargs(run.steps, run.minutes), generator=pipeline,
                          out_dir=run.state_dir, device=run.device, progress=run.progress)

    def finish() -> dict:
        # Shipped with the adapter in float16 (half the bytes); scored as shipped, and in float32 beside it
        save_system(model, run.out_dir / "stage1", record={"stage": "stage1", "steps": result.steps},
                    adapter_dtype=torch.float16)
        shipped, _, _ = load_system(run.out_dir / "stage1", device=run.device)
        captions = load_benchmark("caption")
        return {"LM -> adapter -> generator": _scores(evaluate_alignment(shipped, tokenizer, pipeline, captions)),
                "same, float32 adapter": _scores(evaluate_alignment(model, tokenizer, pipeline, captions)),
                "teacher text encoder -> generator": _scores(evaluate_generator(pipeline, captions))}

    return result, finish


def _train_stage2(run: StageRun):
    from .m3ft import evaluate_alignment, load_system, save_system, stage2_metrics, train_stage2

    r = RECIPE["stage2"]
    if not (run.out_dir / "stage1" / "m2chat.json").is_file():
        raise FileNotFoundError(f"{run.out_dir} holds no stage-1 system; run `m2chat-lite train --stage stage1 "
                                f"--out {run.out_dir}` first")
    model, tokenizer, pipeline = load_system(run.out_dir / "stage1", device=run.device)
    result = train_stage2(model, tokenizer, run.train_config, batch_size=r["batch_size"], pool_size=r["pool_size"],
                          alignment_weight=r["alignment_weight"], alignment_batch_size=r["alignment_batch_size"],
                          diffusion_rows=r["diffusion_rows"], mix=r["mix"], per_conversation=r["per_conversation"],
                          alignment_tasks=RECIPE["stage1"]["tasks"], retention_weight=r["retention_weight"],
                          retention_batch_size=r["retention_batch_size"], lora_keep=r["lora_keep"],
                          anchor_weight=r["anchor_weight"], out_dir=run.state_dir, device=run.device, progress=run.progress)

    def finish() -> dict:
        metrics = stage2_metrics(model, tokenizer, pipeline)
        # stage 2 must not undo stage 1: the pictures drawn through the stage-2 LM, scored as in stage 1
        metrics["LM -> adapter -> generator"] = _scores(
            evaluate_alignment(model, tokenizer, pipeline, load_benchmark("caption")))
        # stage 2 leaves the adapter as stage 1 made it: the stage-2 system points at stage 1's
        save_system(model, run.out_dir / "stage2", record={"stage": "stage2", "steps": result.steps},
                    adapter_dir="../stage1/adapter")
        return metrics

    return result, finish


TRAINERS = {"clip": _train_clip_stage, "lm": _train_lm_stage, "diffusion": _train_diffusion_stage,
            "fusion": _train_fusion_stage, "stage1": _train_stage1, "stage2": _train_stage2}


def run_stage(stage: str, out_dir, steps: int | None = None, minutes: float | None = None, seed: int = 0,
              device: str | None = None, progress: bool = True, grad_accum_steps: int = 1) -> dict:
    """Train one stage into ``out_dir/<stage>``, measure it, record it in the manifest; returns the record.

    Under ``accelerate launch`` every process trains (data parallel, see ``training``); process 0 alone
    measures, saves and records, and the others get the record without metrics."""
    if stage not in STAGES + M2CHAT_STAGES:
        raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES + M2CHAT_STAGES)} "
                         "(or 'foundation' for the first three)")
    if steps is not None and steps <= 0:
        raise ValueError(f"the budget must be positive; got --steps {steps}")
    if minutes is not None and minutes <= 0:
        raise ValueError(f"the budget must be positive; got --minutes {minutes}")
    out_dir = Path(out_dir)
    rank, world = data_parallel()  # first, so that each process of a multi-GPU run takes its own GPU
    main = rank == 0
    run = StageRun(stage, out_dir, get_config("tiny", seed=seed),
                   _train_config(stage, steps, minutes, seed, grad_accum_steps), steps, minutes, seed,
                   get_device(device), progress, grad_accum_steps)
    set_seed(seed)
    start = time.perf_counter()
    result, finish = TRAINERS[stage](run)
    seconds = time.perf_counter() - start  # training alone: measuring and saving are not counted
    metrics = finish() if main else None
    record = {
        "command": "m2chat-lite " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name == "m2chat-lite"
        else f"m2chat-lite train --preset tiny --stage {stage} --out {out_dir}",
        "package_version": __version__, "seed": seed, "steps": result.steps, "train_seconds": round(seconds, 1),
        "device": run.device, "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "recipe": RECIPE[stage], "final_loss": result.final_loss, "metrics": metrics,
        **({"processes": world, "grad_accum_steps": grad_accum_steps} if world * grad_accum_steps > 1 else {}),
    }
    if main:
        shutil.rmtree(run.state_dir, ignore_errors=True)
        update_manifest(out_dir, stage, record)
    wait_for_everyone()  # the next stage, in any process, may load what process 0 just saved
    return record


def _scores(results: dict) -> dict:
    """evaluate_generator's results rounded for the manifest."""
    return {k: ({g: {m: round(v, 4) if isinstance(v, float) else v for m, v in s.items()} for g, s in v.items()}
                if isinstance(v, dict) else round(v, 4)) for k, v in results.items() if k != "images"}


def update_manifest(out_dir, stage: str, record: dict) -> None:
    path = Path(out_dir) / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    manifest[stage] = record
    atomic_write_json(path, manifest)


def run(stage: str, out_dir, **kwargs) -> dict:
    """``stage`` one of ``STAGES + M2CHAT_STAGES``, ``"foundation"`` (the first three, in order) or ``"all"``
    (M²Chat's stages, in order, on the foundation models already in ``out_dir``)."""
    stages = {"foundation": STAGES, "all": M2CHAT_STAGES}.get(stage, (stage,))
    return {s: run_stage(s, out_dir, **kwargs) for s in stages}
