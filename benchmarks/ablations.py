"""Same-budget ablations of M³FT stage 1: which adapter gate is trained, and a GILL-style mapper.

    python benchmarks/ablations.py [--steps 300] [--limit 40] [--captions 100] [--out benchmarks/ablations.json]

Each variant trains a fresh adapter (and the [IMG] embeddings) on the shipped fused LM for ``--steps`` steps
of the stage-1 recipe, then is scored by ``evaluation.py`` like the shipped system: new requests (benchmark
captions), stories and dialogue edits with their words held fixed. Variants:
- ``gate off``: a GILL-style mapper: learnable queries over the LM's states only, no visual branch, no gate;
- ``static gate``: one learned tanh scalar for every query and picture;
- ``adaptive gate``: the recipe's gate, computed per query from both branches.
The runs are short on purpose (a CPU budget): compare them with each other, not with the shipped system.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from m2chat_lite.benchmark import load_benchmark
from m2chat_lite.config import get_config
from m2chat_lite.diffusion import TinyDiffusionPipeline, reference_pipeline_dir
from m2chat_lite.evaluation import eval_dialog, eval_story, eval_t2i
from m2chat_lite.foundation import RECIPE
from m2chat_lite.fusion import load_fused, reference_fusion_dir
from m2chat_lite.m3ft import build_m2chat, train_stage1
from m2chat_lite.pipeline import M2ChatPipeline
from m2chat_lite.training import TrainConfig
from m2chat_lite.utils import atomic_write_json

VARIANTS = {"gate off (GILL-style mapper)": "off", "static gate": "static", "adaptive gate (the recipe)": "adaptive"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--limit", type=int, default=40, help="stories and dialogues scored per variant")
    parser.add_argument("--captions", type=int, default=100, help="captions scored per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "ablations.json")
    args = parser.parse_args()
    recipe = RECIPE["stage1"]
    generator = TinyDiffusionPipeline.from_pretrained(reference_pipeline_dir("tiny"))
    stories = load_benchmark("story", split="test")[:args.limit]
    dialogues = load_benchmark("dialogue", split="test")[:args.limit]
    captions = load_benchmark("caption", split="test")[:args.captions]
    rows = []
    for name, gate_mode in VARIANTS.items():
        fused, tokenizer = load_fused(reference_fusion_dir("tiny"))
        model = build_m2chat(fused, generator, get_config("tiny"), gate_mode=gate_mode, seed=args.seed)
        config = TrainConfig(max_steps=args.steps, lr=recipe["lr"], warmup_steps=recipe["warmup_steps"],
                             weight_decay=0.0, log_every=25, checkpoint_every=10**9, seed=args.seed)
        start = time.perf_counter()
        result = train_stage1(model, tokenizer, config, batch_size=recipe["batch_size"], pool_size=recipe["pool_size"],
                              progress=False)
        seconds = time.perf_counter() - start
        pipe = M2ChatPipeline(model.eval(), tokenizer, generator)
        story = eval_story(pipe, stories, args.seed, text_samples=0, progress=False)
        dialog = eval_dialog(pipe, dialogues, args.seed, progress=False)
        t2i = eval_t2i(pipe, captions, args.seed)
        rows.append({"variant": name, "gate_mode": gate_mode, "steps": result.steps, "train_seconds": round(seconds),
                     "final_parts": {k: round(v, 4) for k, v in (result.history or [{}])[-1].items() if k != "step"},
                     "new_request_exact": t2i["m2chat"]["exact"], "teacher_exact": t2i["teacher"]["exact"],
                     "fid_tiny_clip": t2i["m2chat"]["fid_tiny_clip"],
                     "story_consistency": story["consistency"], "story_alignment_exact": story["alignment_exact"],
                     "story_gate_mean": story["gate_mean"], "edit_success": dialog["edit_success"],
                     "edit_preservation": dialog["edit_preservation"], "edit_exact": dialog["edit_exact"]})
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    atomic_write_json(args.out, {"meta": {"command": "python benchmarks/ablations.py " + " ".join(sys.argv[1:]),
                                          "steps": args.steps, "stories": len(stories), "dialogues": len(dialogues),
                                          "captions": len(captions), "seed": args.seed,
                                          "threads": torch.get_num_threads()},
                                 "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
