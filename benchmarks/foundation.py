"""Measure the tiny foundation models against the issue's bars, on the frozen benchmark split.

    python benchmarks/foundation.py [--root data/checkpoints/tiny] [--threads 2]

Loads the folders written by ``m2chat-lite train --preset tiny --stage foundation --out ROOT`` and prints:
the CLIP's top-1 retrieval among 100 candidates and CLIP score; the LM's perplexity per task; the
generator's oracle scores (one- and two-object prompts, test and held-out) and sampling time per picture;
and the training wall time recorded in ROOT/manifest.json. Bars (issue "tiny foundation models"):
retrieval >= 95%; diffusion all attributes right on >= 90% of one-object and >= 70% of two-object prompts;
sampling <= 0.5 s per picture; the whole recipe <= 20 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from m2chat_lite.benchmark import load_benchmark
from m2chat_lite.foundation import REFERENCE_DIR, clip_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REFERENCE_DIR)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = json.loads((args.root / "manifest.json").read_text())
    print(f"checkpoints: {args.root}   torch threads: {torch.get_num_threads()}")

    print("\n== training (from the manifest) ==")
    total = 0.0
    for stage in ("clip", "lm", "diffusion"):
        if stage in manifest:
            r = manifest[stage]
            total += r["train_seconds"]
            print(f"{stage:<10} {r['steps']:>6} steps  {r['train_seconds']:>7.0f} s  on {r['machine']}, "
                  f"{r['threads']} threads")
    print(f"{'total':<10} {'':>6}        {total:>7.0f} s  (bar: <= 1200 s)")

    if (args.root / "clip").is_dir():
        from m2chat_lite.encoders import load_clip

        clip, tokenizer = load_clip(args.root / "clip")
        print("\n== tiny CLIP (bar: image→text top-1 of 100 >= 95%) ==")
        for split, m in clip_metrics(clip, tokenizer).items():
            print(f"{split:<8} image→text {m['image_to_text_top1_of_100']:.1%}  text→image "
                  f"{m['text_to_image_top1_of_100']:.1%}  CLIP score {m['clip_score']:.1f}  (n={m['n']})")

    if (args.root / "lm").is_dir():
        from m2chat_lite.backbone import benchmark_perplexity, load_lm

        model, tokenizer = load_lm(args.root / "lm")
        print("\n== language model: perplexity on the benchmark's test split ==")
        print(json.dumps(benchmark_perplexity(model, tokenizer, split="test"), indent=1))

    if (args.root / "diffusion").is_dir():
        from m2chat_lite.diffusion import TinyDiffusionPipeline, evaluate_generator, format_scores

        pipeline = TinyDiffusionPipeline.from_pretrained(args.root / "diffusion")
        print("\n== generator: oracle scores on the benchmark's caption prompts "
              "(bars: 1 object exact >= 90%, 2 objects >= 70%) ==")
        results = evaluate_generator(pipeline, load_benchmark("caption"))
        print(format_scores(results))
        start = time.perf_counter()
        for i in range(10):
            pipeline(prompt="a big red circle at the top left", generator=torch.Generator().manual_seed(i))
        print(f"one picture at a time: {(time.perf_counter() - start) / 10:.3f} s per picture (bar: <= 0.5 s)")


if __name__ == "__main__":
    main()
