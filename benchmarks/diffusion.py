"""Benchmark: train the tiny diffusion generator with the reference recipe, then score it with the oracle.

    python benchmarks/diffusion.py --clip data/checkpoints/tiny/clip --out runs/diffusion            # the recipe
    python benchmarks/diffusion.py --clip data/checkpoints/tiny/clip --out /tmp/d --minutes 3        # a quicker look
    python benchmarks/diffusion.py --clip data/checkpoints/tiny/clip --eval-only runs/diffusion/pipeline   # score a saved one

Prints the training speed (steps/s, wall time), the oracle scores on the frozen benchmark's caption
prompts (every attribute right, and per attribute) for one-, two- and three-object prompts of the
``test`` part and of the ``heldout`` part (colour–shape pairs training never shows), and the sampling time
per picture. The pipeline is saved to ``--out/pipeline`` (with the text encoder), the trainer state to
``--out`` (so an interrupted run resumes), the figures to ``--out/metrics.json``.

This script trains the recipe (``foundation.RECIPE["diffusion"]``: a layout planner, 2,000 steps on the CLIP's
token states, then 700 UNet steps reading its map) as ``m2chat-lite train --preset tiny --stage diffusion`` does;
``--recipe '{"layout_planner": false, "single_object_steps": 500}'`` trains the UNet alone, as the recipe did
before 2026-12-02 (its first phase, one-object pictures first). What was measured and tried is in
``benchmarks/DIFFUSION_RECIPE.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from m2chat_lite import __version__
from m2chat_lite.benchmark import load_benchmark
from m2chat_lite.config import get_config
from m2chat_lite.diffusion import (DiffusionRecipe, TinyDiffusionPipeline, evaluate_generator, format_scores,
                                   train_diffusion)
from m2chat_lite.encoders import load_clip
from m2chat_lite.foundation import RECIPE as FOUNDATION_RECIPE
from m2chat_lite.foundation import diffusion_recipe_settings, train_reference_planner
from m2chat_lite.training import TrainConfig
from m2chat_lite.utils import atomic_write_json

# The reference recipe: the training loop's settings from foundation.RECIPE (the data and model settings are
# DiffusionRecipe's defaults, with the layout planner), about 10 minutes on the 2-core reference machine.
_R = FOUNDATION_RECIPE["diffusion"]
RECIPE = {"steps": _R["steps"], "lr": _R["lr"], "warmup": _R["warmup_steps"], "ema": _R["ema_decay"],
          "weight_decay": _R["weight_decay"], "seed": 0}


def score_table(results: dict) -> dict:
    """The headline figures: exact (every attribute right) per split and object count."""
    return {f"{split}/{group}": groups[group]["exact"] for split, groups in results.items()
            if isinstance(groups, dict) for group in groups}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", type=Path, default=Path("runs/clip"), help="the trained tiny CLIP folder")
    parser.add_argument("--out", type=Path, default=None, help="folder for the pipeline, trainer state, metrics.json")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {RECIPE['steps']})")
    budget.add_argument("--minutes", type=float, default=None, help="wall-clock training budget instead of steps")
    parser.add_argument("--lr", type=float, default=RECIPE["lr"])
    parser.add_argument("--seed", type=int, default=RECIPE["seed"])
    parser.add_argument("--recipe", default=json.dumps(diffusion_recipe_settings()),
                        help='DiffusionRecipe settings as JSON, e.g. \'{"layout_planner": true, "batch_size": 16}\'')
    parser.add_argument("--eval-only", type=Path, default=None, help="score a saved pipeline folder, no training")
    parser.add_argument("--eval-test", type=int, default=300, help="benchmark test prompts to score (max 300)")
    parser.add_argument("--eval-heldout", type=int, default=100, help="benchmark held-out prompts to score (max 100)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the recipe's)")
    parser.add_argument("--sample-steps", type=int, default=None, help="sampling steps (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.eval_only is None and args.out is None:
        parser.error("give --out (where to train to) or --eval-only (a pipeline to score)")
    torch.set_num_threads(args.threads)
    metrics: dict = {"package_version": __version__, "threads": args.threads}

    if args.eval_only is not None:
        pipeline = TinyDiffusionPipeline.from_pretrained(args.eval_only, device=args.device)
        if pipeline.text_encoder is None:
            pipeline.text_encoder, pipeline.tokenizer = load_clip(args.clip, device=args.device)
    else:
        clip, tokenizer = load_clip(args.clip, device=args.device)
        recipe = DiffusionRecipe.from_dict(json.loads(args.recipe))
        steps = None if args.minutes else (args.steps or RECIPE["steps"])
        train_config = TrainConfig(max_steps=steps, max_seconds=args.minutes * 60 if args.minutes else None,
                                   lr=args.lr, warmup_steps=RECIPE["warmup"], weight_decay=RECIPE["weight_decay"],
                                   ema_decay=RECIPE["ema"], seed=args.seed, log_every=25,
                                   checkpoint_every=200, cpu_bf16=_R.get("cpu_bf16", False))
        start = time.perf_counter()
        planner = None
        if recipe.layout_planner:  # the recipe's planner first (its own state folder, so it resumes too)
            planner, _ = train_reference_planner(get_config("tiny"), clip, tokenizer, seed=args.seed,
                                                 device=args.device, out_dir=args.out / "planner")
        pipeline, result = train_diffusion(get_config("tiny"), clip, tokenizer, train_config, out_dir=args.out,
                                           device=args.device, recipe=recipe, planner=planner)
        wall = time.perf_counter() - start
        print(f"trained {result.steps} steps in {result.seconds:.1f} s ({result.steps / result.seconds:.2f} steps/s, "
              f"batch {recipe.batch_size}); wall time with saving {wall:.1f} s; final loss {result.final_loss:.4f}")
        metrics.update({"command": " ".join(sys.argv), "recipe": asdict(recipe),
                        "train": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                        "steps": result.steps, "train_seconds": result.seconds, "wall_seconds": wall,
                        "steps_per_second": result.steps / result.seconds, "final_loss": result.final_loss,
                        "history": result.history})

    samples = load_benchmark("caption", split="test")[: args.eval_test] + \
        load_benchmark("caption", split="heldout")[: args.eval_heldout]
    kwargs = {k: v for k, v in (("guidance_scale", args.guidance), ("num_inference_steps", args.sample_steps))
              if v is not None}
    results = evaluate_generator(pipeline, samples, **kwargs)
    print(f"\noracle scores on {len(samples)} benchmark prompts "
          f"({pipeline.defaults['num_inference_steps'] if 'num_inference_steps' not in kwargs else kwargs['num_inference_steps']} "
          f"steps, guidance {kwargs.get('guidance_scale', pipeline.defaults['guidance_scale'])}):")
    print(format_scores(results))
    # sampling time per picture for one prompt at a time (the CLI's case) as well as batched (above)
    one = time.perf_counter()
    pipeline("a large red circle at the top left", generator=torch.Generator().manual_seed(0), **kwargs)
    single = time.perf_counter() - one
    print(f"one picture alone: {single:.3f} s")
    metrics.update({"scores": results, "exact": score_table(results),
                    "seconds_per_image_batched": results["seconds_per_image"], "seconds_single_image": single})
    if args.out is not None and args.eval_only is None:
        atomic_write_json(args.out / "metrics.json", metrics)
        print(f"\nsaved the pipeline to {args.out / 'pipeline'} and the figures to {args.out / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main()
