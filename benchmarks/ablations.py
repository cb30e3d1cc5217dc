"""Same-budget ablations: the adapter's gate (``--kind gate``) and the M³FT stages (``--kind m3ft``).

    python benchmarks/ablations.py --kind gate [--steps 300] [--limit 40] [--captions 100]
    python benchmarks/ablations.py --kind m3ft [--steps 300] [--stage2-steps 100] [--limit 40] [--captions 100]
                                   [--only VARIANT ...]

Each variant starts from the shipped fused LM and generator, trains on a CPU budget and is scored by
``m2chat_lite.ablations.score`` (``evaluation.py``) like the shipped system. ``--kind gate`` writes
``benchmarks/ablations.json`` (gate off: a GILL-style mapper; static; adaptive: the recipe), each trained
with ``--steps`` of stage 1. ``--kind m3ft`` writes ``benchmarks/m3ft_variants.json`` (stage 1 only,
stage 2 only, both stages, both stages with stage 2 on the LM loss alone, one joint stage with
``max(steps, stage2-steps)`` steps), scored on the written
side too (``--questions`` visual questions). Every variant trains with the recipe's settings
(``foundation.RECIPE``: its learning rates, the diffusion term's rows, stage 1's share of cached steps), so it
differs from the recipe only where its name says. ``--steps 1315 --stage2-steps 280`` is the shipped budget
(``RECIPE``); shorter runs are comparable with each other, not with the shipped system. ``--only`` reruns some M³FT
variants after a change that touches only them and keeps the file's other rows (the file's ``meta.rerun`` says
which and how).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from m2chat_lite.ablations import GATE_VARIANTS, M3FT_VARIANTS, score, train_gate_variant, train_m3ft_variants
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
    parser.add_argument("--only", nargs="+", default=None, metavar="VARIANT",
                        help="rerun only these variants (--kind m3ft) and keep the other rows of --out, which must "
                             "have been written with the same settings")
    args = parser.parse_args()
    out = args.out or HERE / ("ablations.json" if args.kind == "gate" else "m3ft_variants.json")
    if args.only and args.kind != "m3ft":
        parser.error("--only is for --kind m3ft")
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
        trained = train_m3ft_variants(args.steps, args.stage2_steps, fusion_dir, generator, args.seed,
                                      variants=args.only or M3FT_VARIANTS)
    command = "python benchmarks/ablations.py " + " ".join(sys.argv[1:])
    meta = {"command": command, "kind": args.kind,
            "steps": args.steps, "stories": len(stories), "dialogues": len(dialogues), "captions": len(captions),
            "seed": args.seed, "threads": torch.get_num_threads()}
    if args.kind == "m3ft":
        meta.update(stage2_steps=args.stage2_steps, questions=len(questions))
    kept = {}
    if args.only:  # the other rows come from the file, measured with the same settings
        old = json.loads(out.read_text())
        same = {k: v for k, v in old["meta"].items() if k not in ("command", "threads", "rerun")}
        if same != {k: v for k, v in meta.items() if k not in ("command", "threads")}:
            sys.exit(f"{out} was written with other settings ({old['meta']['command']}); rerun every variant")
        kept = {row["variant"]: row for row in old["rows"] if row["variant"] not in args.only}
        meta = {**old["meta"], "rerun": [*old["meta"].get("rerun", []), {"command": command, "variants": args.only,
                                                                         "threads": torch.get_num_threads()}]}
    rows = {}
    for name, pipe, info in trained:
        rows[name] = {"variant": name, **info, **score(pipe, stories, dialogues, captions, questions, args.seed)}
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[name].items()}, flush=True)
    order = list(GATE_VARIANTS) if args.kind == "gate" else list(M3FT_VARIANTS)
    merged = {**kept, **rows}
    rows = [merged[name] for name in order if name in merged]
    atomic_write_json(out, {"meta": meta, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
