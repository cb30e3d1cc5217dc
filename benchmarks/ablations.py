"""Same-budget ablations: the adapter's gate (``--kind gate``) and the M³FT stages (``--kind m3ft``).

    python benchmarks/ablations.py --kind gate [--steps 300] [--limit 40] [--captions 100]
    python benchmarks/ablations.py --kind m3ft [--steps 300] [--stage2-steps 100] [--limit 40] [--captions 100]

Each variant starts from the shipped fused LM and generator, trains on a CPU budget and is scored by
``m2chat_lite.ablations.score`` (``evaluation.py``) like the shipped system. ``--kind gate`` writes
``benchmarks/ablations.json`` (gate off: a GILL-style mapper; static; adaptive: the recipe), each trained
with ``--steps`` of stage 1. ``--kind m3ft`` writes ``benchmarks/m3ft_variants.json`` (stage 1 only,
stage 2 only, both stages, one joint stage with ``max(steps, stage2-steps)`` steps), scored on the written
side too (``--questions`` visual questions). The runs are short on purpose: compare the rows with each
other, not with the shipped system (3,000 + 800 steps).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from m2chat_lite.ablations import GATE_VARIANTS, score, train_gate_variant, train_m3ft_variants
from m2chat_lite.benchmark import load_benchmark
from m2chat_lite.diffusion import TinyDiffusionPipeline, reference_pipeline_dir
from m2chat_lite.fusion import reference_fusion_dir
from m2chat_lite.utils import atomic_write_json

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("gate", "m3ft"), required=True)
    parser.add_argument("--steps", type=int, default=300, help="stage-1 steps")
    parser.add_argument("--stage2-steps", type=int, default=100, help="stage-2 steps (--kind m3ft)")
    parser.add_argument("--limit", type=int, default=40, help="stories and dialogues scored per variant")
    parser.add_argument("--captions", type=int, default=100, help="captions scored per variant")
    parser.add_argument("--questions", type=int, default=100, help="visual questions per variant (--kind m3ft)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or HERE / ("ablations.json" if args.kind == "gate" else "m3ft_variants.json")
    generator = TinyDiffusionPipeline.from_pretrained(reference_pipeline_dir("tiny"))
    fusion_dir = reference_fusion_dir("tiny")
    stories = load_benchmark("story", split="test")[:args.limit]
    dialogues = load_benchmark("dialogue", split="test")[:args.limit]
    captions = load_benchmark("caption", split="test")[:args.captions]
    questions = load_benchmark("vqa", split="test")[:args.questions] if args.kind == "m3ft" else []
    if args.kind == "gate":
        trained = ((name, *train_gate_variant(mode, args.steps, fusion_dir, generator, args.seed))
                   for name, mode in GATE_VARIANTS.items())
    else:
        trained = train_m3ft_variants(args.steps, args.stage2_steps, fusion_dir, generator, args.seed)
    rows = []
    for name, pipe, info in trained:
        rows.append({"variant": name, **info, **score(pipe, stories, dialogues, captions, questions, args.seed)})
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    meta = {"command": "python benchmarks/ablations.py " + " ".join(sys.argv[1:]), "kind": args.kind,
            "steps": args.steps, "stories": len(stories), "dialogues": len(dialogues), "captions": len(captions),
            "seed": args.seed, "threads": torch.get_num_threads()}
    if args.kind == "m3ft":
        meta.update(stage2_steps=args.stage2_steps, questions=len(questions))
    atomic_write_json(out, {"meta": meta, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
