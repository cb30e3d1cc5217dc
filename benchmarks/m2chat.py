"""Measure M²Chat's own parts against the issue's bars, on the frozen benchmark split.

    python benchmarks/m2chat.py [--root data/checkpoints/tiny] [--threads 2]

Loads the folders written by ``m2chat-lite train --preset tiny --stage fusion|stage1 --out ROOT`` and prints:
- prompt fusion (``ROOT/fusion``): exact answers to the visual questions, per kind, test and held-out
  (bar: >= 97%), with the gate as trained and with the gate closed (the LM alone);
- M³FT stage 1 (``ROOT/stage1``): oracle scores of pictures drawn from the caption through the LM, the
  adapter and the generator, beside the generator fed its own text encoder, from the same noise
  (bar: fully-right pictures within 5 points of that teacher row);
- M³FT stage 2 (``ROOT/stage2``): visual questions, and the assistant's side of stories and dialogues,
  teacher-forced (loss, token accuracy, [IMG] recall and precision);
- the interleaved pipeline (the shipped system as ``m2chat-lite demo`` loads it): seconds to load, per
  story (up to 4 pictures) and per 3-turn dialogue, tokens written and pictures drawn;
- the training wall time recorded in ROOT/manifest.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from m2chat_lite.benchmark import load_benchmark
from m2chat_lite.foundation import REFERENCE_DIR


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
    for stage in ("fusion", "stage1", "stage2"):
        if stage in manifest:
            r = manifest[stage]
            print(f"{stage:<8} {r['steps']:>6} steps  {r['train_seconds']:>7.0f} s  on {r['machine']}, "
                  f"{r['threads']} threads")

    if (args.root / "fusion").is_dir():
        from m2chat_lite.fusion import gate_closed, load_fused, vqa_accuracy

        model, tokenizer = load_fused(args.root / "fusion")
        print("\n== prompt fusion: exact answers to visual questions (bar: >= 97%) ==")
        for split in ("test", "heldout"):
            questions = load_benchmark("vqa", split=split)
            scores = vqa_accuracy(model, tokenizer, questions)
            print(f"{split:<8} {scores['accuracy']:.1%} of {scores['n']}   " +
                  "  ".join(f"{k} {v:.0%}" for k, v in scores["per_kind"].items()))
            print(" " * 9 + "by objects in the picture: " +
                  "  ".join(f"{n}: {v:.0%}" for n, v in scores["per_objects"].items()))
        with gate_closed(model):
            closed = vqa_accuracy(model, tokenizer, load_benchmark("vqa", split="test"))
        print(f"gate closed (the LM alone, LoRA kept): {closed['accuracy']:.1%}   tanh(gate) as trained: "
              f"{model.gate_value():.3f}")

    if (args.root / "stage1").is_dir():
        from m2chat_lite.diffusion import evaluate_generator, format_scores
        from m2chat_lite.m3ft import evaluate_alignment, load_system

        model, tokenizer, pipeline = load_system(args.root / "stage1")
        captions = load_benchmark("caption")
        print("\n== M³FT stage 1: caption → LM → adapter → generator (bar: within 5 points of the teacher) ==")
        ours = evaluate_alignment(model, tokenizer, pipeline, captions)
        print(format_scores(ours))
        print("\n-- teacher row: caption → the generator's own text encoder → generator --")
        teacher = evaluate_generator(pipeline, captions)
        print(format_scores(teacher))
        gap = teacher["all"]["all"]["exact"] - ours["all"]["all"]["exact"]
        print(f"\nfully right, all captions: adapter {ours['all']['all']['exact']:.1%}, teacher "
              f"{teacher['all']['all']['exact']:.1%}, gap {100 * gap:.1f} points")

    if (args.root / "stage2").is_dir():
        from m2chat_lite.m3ft import load_system, stage2_metrics

        model, tokenizer, _ = load_system(args.root / "stage2")
        metrics = stage2_metrics(model, tokenizer)
        print("\n== M³FT stage 2: test split ==")
        print(f"visual questions: {metrics['vqa']['accuracy']:.1%} exact of {metrics['vqa']['n']}   " +
              "  ".join(f"{k} {v:.0%}" for k, v in metrics["vqa"]["per_kind"].items()))
        print("  by objects in the picture: " +
              "  ".join(f"{n}: {v:.0%}" for n, v in metrics["vqa"]["per_objects"].items()))
        for task in ("story", "dialogue"):
            r = metrics[task]
            print(f"{task:<9} teacher-forced: loss {r['loss']:.3f}, token accuracy {r['token_accuracy']:.1%}, "
                  f"[IMG] recall {r['img_recall']:.1%}, precision {r['img_precision']:.1%} ({r['n']} samples)")
        pipeline_speed(args.root / "stage2")


def pipeline_speed(folder: Path, repeats: int = 3) -> None:
    """Seconds per story and per dialogue through M2ChatPipeline, greedy, as `m2chat-lite demo` runs them."""
    import time

    from m2chat_lite.cli import DEMO_DIALOGUE, DEMO_STORY
    from m2chat_lite.pipeline import M2ChatPipeline

    start = time.perf_counter()
    pipe = M2ChatPipeline.from_pretrained(folder, device="cpu")
    print(f"\n== the pipeline (CPU, {torch.get_num_threads()} threads) ==\nload: {time.perf_counter() - start:.2f} s")
    for name, run in (("story", lambda seed: pipe.story(DEMO_STORY, seed=seed)),
                      ("dialogue", lambda seed: pipe.dialogue(DEMO_DIALOGUE, seed=seed))):
        times, pictures, words = [], 0, 0
        for seed in range(repeats):
            start = time.perf_counter()
            messages = run(seed)
            times.append(time.perf_counter() - start)
            segments = [s for m in messages if m["role"] == "assistant" for s in m["content"]]
            pictures += sum(s["type"] == "image" for s in segments)
            words += sum(len(s["text"].split()) for s in segments if s["type"] == "text")
        print(f"{name:<9} {min(times):.2f} s (best of {repeats}), {pictures / repeats:.1f} pictures and "
              f"{words / repeats:.0f} words each")


if __name__ == "__main__":
    main()
