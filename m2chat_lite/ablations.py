"""The paper's ablations as functions: train a variant on a CPU budget, then score it like the shipped system.

Taught in notebook ``10_evaluation_and_ablations``, which loads the JSON that ``benchmarks/ablations.py``
writes with these functions (the test suite reruns one small variant). Every variant starts from the same
shipped parts (the fused LM of notebook 05 and the generator of notebook 04) and the same seed; only what
the ablation names changes.

- **Gate variants** (``train_gate_variant``): M³FT stage 1 with the adapter's gate ``off`` (a GILL-style
  mapper: queries over the LM's states, no visual branch, no gate), ``static`` (one learned tanh scalar) or
  ``adaptive`` (the recipe's: computed per query from both branches).
- **M³FT variants** (``train_m3ft_variants``): stage 1 only, stage 2 only (the adapter never trained), both
  stages in order (the recipe), both stages with stage 2 on the LM loss alone (no stage-1 loss to keep the
  adapter's input in place), and one joint stage with both groups and both losses
  (``m3ft.train_joint``). A joint step costs about a step of each stage and sees a batch of each, so the
  joint run gets ``max(stage1_steps, stage2_steps)`` steps: at least the data of the two-stage run.

``score`` is the row every variant gets: new requests (benchmark captions), stories and dialogue edits
illustrated with their words fixed (``evaluation.py``), and with ``text=True`` the written side (the
stories teacher-forced, visual questions answered).
"""

from __future__ import annotations

import copy
import time
from typing import Iterator, Sequence

from .config import get_config
from .data import Sample
from .diffusion import TinyDiffusionPipeline
from .evaluation import eval_dialog, eval_story, eval_t2i, eval_vqa
from .foundation import RECIPE, stage1_recipe_kwargs
from .fusion import load_fused
from .m3ft import M2ChatModel, build_m2chat, train_joint, train_stage1, train_stage2
from .pipeline import M2ChatPipeline
from .training import TrainConfig, TrainResult
from .utils import set_seed

GATE_VARIANTS = {"gate off (GILL-style mapper)": "off", "static gate": "static",
                 "adaptive gate (the recipe)": "adaptive"}
NO_ALIGNMENT = "both stages, stage 2 on the LM loss alone"
M3FT_VARIANTS = ("stage 1 only", "stage 2 only", "both stages (the recipe)", NO_ALIGNMENT, "one joint stage")


def _config(stage: str, steps: int, seed: int) -> TrainConfig:
    r = RECIPE[stage]
    return TrainConfig(max_steps=steps, lr=r["lr"], warmup_steps=min(r["warmup_steps"], max(1, steps // 5)),
                       weight_decay=r["weight_decay"], log_every=max(1, min(25, steps)), checkpoint_every=10**9,
                       seed=seed)


def fresh_system(fusion_dir, generator: TinyDiffusionPipeline, gate_mode: str = "adaptive", seed: int = 0):
    """``(model, tokenizer)``: the fused LM loaded again from ``fusion_dir`` and a fresh adapter (``seed``)."""
    fused, tokenizer = load_fused(fusion_dir)
    return build_m2chat(fused, generator, get_config("tiny"), gate_mode=gate_mode, seed=seed,
                        visual_reads_words=RECIPE["stage1"]["visual_reads_words"]), tokenizer


def _final_parts(result: TrainResult) -> dict:
    last = (result.history or [{}])[-1]
    return {k: round(v, 4) for k, v in last.items() if k != "step" and isinstance(v, float)}


def train_gate_variant(gate_mode: str, steps: int, fusion_dir, generator: TinyDiffusionPipeline, seed: int = 0,
                       progress: bool = False, batch_size: int | None = None, pool_size: int | None = None
                       ) -> tuple[M2ChatPipeline, dict]:
    """Stage 1 for ``steps`` with the adapter's gate in ``gate_mode``: ``(pipeline, training info)``.
    ``batch_size`` and ``pool_size`` default to the recipe's (smaller ones make a quick test)."""
    model, tokenizer = fresh_system(fusion_dir, generator, gate_mode, seed)
    set_seed(seed)  # the diffusion loss's noise: each variant the same, whatever ran before it
    start = time.perf_counter()
    result = train_stage1(model, tokenizer, _config("stage1", steps, seed), **stage1_recipe_kwargs(steps, None),
                          generator=generator, batch_size=batch_size or RECIPE["stage1"]["batch_size"],
                          pool_size=pool_size or RECIPE["stage1"]["pool_size"], progress=progress)
    info = {"gate_mode": gate_mode, "steps": result.steps, "train_seconds": round(time.perf_counter() - start),
            "final_parts": _final_parts(result)}
    return M2ChatPipeline(model.eval(), tokenizer, generator), info


def train_m3ft_variants(stage1_steps: int, stage2_steps: int, fusion_dir, generator: TinyDiffusionPipeline,
                        seed: int = 0, variants: Sequence[str] = M3FT_VARIANTS, progress: bool = False,
                        batch_size: int | None = None, pool_size: int | None = None
                        ) -> Iterator[tuple[str, M2ChatPipeline, dict]]:
    """Yield ``(variant, pipeline, training info)`` for each of ``variants``, in the order of
    ``M3FT_VARIANTS``, one at a time: score each before asking for the next, because "both stages" goes on
    training the "stage 1 only" system (so the two share their stage 1 exactly; the variant without the
    stage-1 loss in stage 2 trains a copy of it). ``batch_size`` and
    ``pool_size`` default to stage 1's recipe (``RECIPE["stage1"]``), used for both stages here."""
    unknown = [v for v in variants if v not in M3FT_VARIANTS]
    if unknown:
        raise ValueError(f"unknown M³FT variant {unknown[0]!r}; choose from {', '.join(M3FT_VARIANTS)}")
    batch = batch_size or RECIPE["stage1"]["batch_size"]
    pool = pool_size or RECIPE["stage1"]["pool_size"]

    def stage1(model: M2ChatModel, tokenizer) -> dict:
        set_seed(seed)  # the diffusion loss's noise: each variant the same, whatever ran before it
        start = time.perf_counter()
        result = train_stage1(model, tokenizer, _config("stage1", stage1_steps, seed), batch_size=batch,
                              pool_size=pool, progress=progress, generator=generator,
                              **stage1_recipe_kwargs(stage1_steps, None))
        return {"stage1_steps": result.steps, "stage1_seconds": round(time.perf_counter() - start),
                "stage1_final": _final_parts(result)}

    def stage2(model: M2ChatModel, tokenizer, alignment_weight: float = RECIPE["stage2"]["alignment_weight"]) -> dict:
        set_seed(seed)
        start = time.perf_counter()
        # the alignment batch: train_stage2's default, half the batch (the recipe's 16 of 32)
        result = train_stage2(model, tokenizer, _config("stage2", stage2_steps, seed), batch_size=batch,
                              pool_size=pool, alignment_weight=alignment_weight, progress=progress,
                              diffusion_rows=RECIPE["stage2"]["diffusion_rows"],
                              per_conversation=RECIPE["stage2"]["per_conversation"])
        return {"stage2_steps": result.steps, "stage2_seconds": round(time.perf_counter() - start),
                "stage2_alignment_weight": alignment_weight, "stage2_final": _final_parts(result)}

    after_stage1 = None  # (model, tokenizer, info) of stage 1, shared by "stage 1 only" and "both stages"
    for variant in [v for v in M3FT_VARIANTS if v in variants]:  # in this order: "both" continues "stage 1"
        if variant in ("stage 1 only", "both stages (the recipe)", NO_ALIGNMENT):
            if after_stage1 is None:
                model, tokenizer = fresh_system(fusion_dir, generator, seed=seed)
                after_stage1 = (model, tokenizer, stage1(model, tokenizer))
            model, tokenizer, info = after_stage1
            if variant == "both stages (the recipe)":
                if NO_ALIGNMENT in variants:
                    model = copy.deepcopy(model)  # the next variant starts from the same stage-1 system
                info = {**info, **stage2(model, tokenizer)}
            elif variant == NO_ALIGNMENT:
                info = {**info, **stage2(model, tokenizer, alignment_weight=0.0)}
        elif variant == "stage 2 only":
            model, tokenizer = fresh_system(fusion_dir, generator, seed=seed)
            info = stage2(model, tokenizer)
        else:  # one joint stage
            model, tokenizer = fresh_system(fusion_dir, generator, seed=seed)
            steps = max(stage1_steps, stage2_steps)
            set_seed(seed)
            start = time.perf_counter()
            result = train_joint(model, tokenizer, _config("stage1", steps, seed), batch_size=batch, pool_size=pool,
                                 progress=progress)
            info = {"joint_steps": result.steps, "joint_seconds": round(time.perf_counter() - start),
                    "joint_final": _final_parts(result)}
        yield variant, M2ChatPipeline(model.eval(), tokenizer, generator), info


def score(pipe: M2ChatPipeline, stories: Sequence[Sample], dialogues: Sequence[Sample], captions: Sequence[Sample],
          questions: Sequence[Sample] = (), seed: int = 0) -> dict:
    """One row of the ablation table: pictures (new requests, story frames, dialogue edits, each with its
    words fixed) and, if ``questions`` are given, the written side (the stories teacher-forced, the visual
    questions answered)."""
    story = eval_story(pipe, stories, seed, text_samples=0, progress=False)
    dialog = eval_dialog(pipe, dialogues, seed, progress=False)
    t2i = eval_t2i(pipe, captions, seed)
    row = {"new_request_exact": t2i["m2chat"]["exact"], "teacher_exact": t2i["teacher"]["exact"],
           "fid_tiny_clip": t2i["m2chat"]["fid_tiny_clip"], "story_consistency": story["consistency"],
           "story_alignment_exact": story["alignment_exact"], "story_gate_mean": story["gate_mean"],
           "edit_success": dialog["edit_success"], "edit_preservation": dialog["edit_preservation"],
           "edit_exact": dialog["edit_exact"]}
    if questions:
        row.update({"story_text_loss": story["text_loss"], "story_token_accuracy": story["text_token_accuracy"],
                    "img_recall": story["img_recall"], "img_precision": story["img_precision"],
                    "vqa_exact": eval_vqa(pipe, questions)["exact"]})
    return row
