"""The creativity–consistency trade-off: the shipped system with its adapter's gate switched.

    python benchmarks/gate_sweep.py [--model DIR] [--limit 40] [--captions 100] [--out benchmarks/gate_sweep.json]

For each gate setting (``off``, ``fixed`` at 0, 0.25, 0.5, 0.75 and 1, and the gate as trained) the same
system, with nothing retrained, is scored by ``evaluation.py``:
- **consistency**: benchmark stories illustrated with their words fixed (does the character keep its shape
  and colour from frame to frame?) and dialogue edits (are the objects the edit did not touch kept?);
- **alignment / creativity**: the same frames against what their words ask for, edits against what changed,
  and new requests (benchmark captions, no picture before: the gate is 0 there by construction, so this
  row only moves with the rest of the system).
A last row is the **two-step baseline**: each picture drawn from the words just before it by the generator with
its own text encoder (what a user would build without M²Chat; `evaluation.illustrate_two_step`).
The JSON it writes is what notebook 10 plots; the command that made the shipped copy is in its "meta".
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from m2chat_lite.evaluation import eval_dialog, eval_story, eval_t2i
from m2chat_lite.benchmark import load_benchmark
from m2chat_lite.pipeline import M2ChatPipeline
from m2chat_lite.utils import atomic_write_json

SETTINGS = [("off", None), ("fixed", 0.0), ("fixed", 0.25), ("fixed", 0.5), ("fixed", 0.75), ("fixed", 1.0),
            ("trained", None), ("two-step", None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=40, help="stories and dialogues per setting")
    parser.add_argument("--captions", type=int, default=100, help="captions per setting (new requests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "gate_sweep.json")
    args = parser.parse_args()
    pipe = M2ChatPipeline.from_pretrained(args.model, device="cpu")
    trained = pipe.model.adapter.gate_mode, pipe.model.adapter.config.gate_value
    stories = load_benchmark("story", split="test")[:args.limit]
    dialogues = load_benchmark("dialogue", split="test")[:args.limit]
    captions = load_benchmark("caption", split="test")[:args.captions]
    rows = []
    for mode, value in SETTINGS:
        start = time.perf_counter()
        two_step = mode == "two-step"
        if mode in ("trained", "two-step"):
            pipe.model.adapter.set_gate(*trained)
        else:
            pipe.model.adapter.set_gate(mode, value)
        story = eval_story(pipe, stories, args.seed, text_samples=0, progress=False, two_step=two_step)
        dialog = eval_dialog(pipe, dialogues, args.seed, progress=False, two_step=two_step)
        t2i = eval_t2i(pipe, captions, args.seed)["teacher" if two_step else "m2chat"]
        label = {"trained": f"trained ({trained[0]})", "two-step": "two-step (words → text encoder)"}.get(
            mode, f"{mode} {value}" if value is not None else mode)
        rows.append({"gate": label, "mode": mode, "value": value,
                     "story_consistency": story["consistency"], "story_alignment_exact": story["alignment_exact"],
                     "story_gate_mean": story["gate_mean"], "edit_preservation": dialog["edit_preservation"],
                     "edit_success": dialog["edit_success"], "edit_exact": dialog["edit_exact"],
                     "dialog_gate_mean": dialog["gate_mean"], "new_request_exact": t2i["exact"],
                     "seconds": round(time.perf_counter() - start, 1)})
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    atomic_write_json(args.out, {"meta": {"command": "python benchmarks/gate_sweep.py " + " ".join(sys.argv[1:]),
                                          "stories": len(stories), "dialogues": len(dialogues),
                                          "captions": len(captions), "seed": args.seed,
                                          "threads": torch.get_num_threads(), "system": pipe.model.record},
                                 "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
