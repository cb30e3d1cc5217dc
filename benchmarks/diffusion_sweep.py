"""Search for the tiny generator's recipe: train several variants at once and score each with the oracle.

    python benchmarks/diffusion_sweep.py --variants benchmarks/diffusion_sweep.json --workers 2 --out /tmp/sweep
    python benchmarks/diffusion_sweep.py --variants ... --device cuda --workers 12 --out $OUT   # on a GPU

Each variant is a JSON object: ``name``; ``steps``; optional ``lr``; ``recipe`` (``DiffusionRecipe``
overrides); ``config`` (preset overrides, e.g. ``{"unet_block_channels": [96, 96, 128]}``). Every variant
is trained from scratch (seed 0, the reference CLIP as text encoder), then scored on the benchmark's
caption prompts at each ``--guidance`` value. Prints one table (every attribute right, per object count,
test and held-out pairs) and writes ``sweep.json``. On a GPU the loop trains in bf16, so the figures
rank recipes; the reference numbers come from ``benchmarks/diffusion.py`` on the CPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
import traceback
from pathlib import Path

COLUMNS = [("test", "1 object"), ("test", "2 objects"), ("test", "3 objects"), ("heldout", "all")]


def run_variant(job: dict) -> dict:
    import torch

    from m2chat_lite.benchmark import load_benchmark
    from m2chat_lite.config import get_config
    from m2chat_lite.diffusion import DiffusionRecipe, evaluate_generator, train_diffusion
    from m2chat_lite.encoders import load_clip
    from m2chat_lite.training import TrainConfig

    variant, args = job["variant"], job["args"]
    torch.set_num_threads(args["threads"])
    try:
        config = get_config("tiny", **variant.get("config", {}))
        recipe = DiffusionRecipe.from_dict(variant.get("recipe", {}))
        clip, tokenizer = load_clip(args["clip"], device=args["device"])
        train_config = TrainConfig(max_steps=variant["steps"], lr=variant.get("lr", 2e-3), warmup_steps=100,
                                   ema_decay=variant.get("ema", 0.995), seed=0, log_every=50)
        start = time.perf_counter()
        pipeline, result = train_diffusion(config, clip, tokenizer, train_config, device=args["device"],
                                           recipe=recipe, progress=False)
        train_seconds = time.perf_counter() - start
        samples = load_benchmark("caption", split="test")[: args["eval_test"]] + \
            load_benchmark("caption", split="heldout")[: args["eval_heldout"]]
        scores = {}
        for guidance in args["guidance"]:
            results = evaluate_generator(pipeline, samples, guidance_scale=guidance)
            scores[str(guidance)] = {f"{split}/{group}": results[split][group]["exact"] for split, group in COLUMNS
                                     if group in results.get(split, {})}
            scores[str(guidance)]["attributes (test, 1 and 2 objects)"] = {
                group: {k: round(v, 3) for k, v in results["test"][group].items() if k != "n"}
                for group in ("1 object", "2 objects") if group in results.get("test", {})}
        params = sum(p.numel() for p in pipeline.unet.parameters())
        return {"name": variant["name"], "variant": variant, "params": params, "train_seconds": train_seconds,
                "final_loss": result.final_loss, "scores": scores}
    except Exception:
        return {"name": variant["name"], "variant": variant, "error": traceback.format_exc()}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", type=Path, required=True, help="JSON list of variants")
    parser.add_argument("--only", default=None, help="comma-separated variant names to run")
    parser.add_argument("--clip", default="data/checkpoints/tiny/clip")
    parser.add_argument("--out", type=Path, required=True, help="folder for sweep.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    parser.add_argument("--guidance", default="2,3,5", help="guidance scales to score")
    parser.add_argument("--eval-test", type=int, default=300)
    parser.add_argument("--eval-heldout", type=int, default=100)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every variant's steps (quick checks)")
    args = parser.parse_args(argv)
    variants = json.loads(args.variants.read_text())
    if args.only:
        wanted = set(args.only.split(","))
        variants = [v for v in variants if v["name"] in wanted]
    for v in variants:
        v["steps"] = max(1, int(v["steps"] * args.steps_scale))
    shared = {"clip": args.clip, "device": args.device, "threads": args.threads, "eval_test": args.eval_test,
              "eval_heldout": args.eval_heldout, "guidance": [float(g) for g in args.guidance.split(",")]}
    jobs = [{"variant": v, "args": shared} for v in variants]
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = []
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for r in pool.imap_unordered(run_variant, jobs):
            results.append(r)
            status = "ERROR " + r["error"].strip().splitlines()[-1] if "error" in r else \
                f"{r['train_seconds']:.0f} s, " + json.dumps(r["scores"])
            print(f"[{time.perf_counter() - start:6.0f} s] finished {r['name']}: {status}", flush=True)
            (args.out / "sweep.json").write_text(json.dumps(results, indent=1))
    print(f"\nexact (every attribute right) on the benchmark's caption prompts; device {args.device}")
    print(f"{'variant':<28} {'steps':>5} {'params':>6} {'g':>3} " + " ".join(f"{s[:4]}/{g[:5]:<5}" for s, g in COLUMNS)
          + "  loss   train s")
    for r in sorted(results, key=lambda r: r["name"]):
        if "error" in r:
            print(f"{r['name']:<28} ERROR {r['error'].strip().splitlines()[-1]}")
            continue
        for g, s in r["scores"].items():
            cells = " ".join(f"{s.get(f'{a}/{b}', float('nan')):>10.1%}" for a, b in COLUMNS)
            # (per-attribute scores are in sweep.json)
            print(f"{r['name']:<28} {r['variant']['steps']:>5} {r['params'] / 1e6:>5.2f}M {float(g):>3g} {cells}"
                  f"  {r['final_loss']:.4f} {r['train_seconds']:>6.0f}")
    return results


if __name__ == "__main__":
    main()
