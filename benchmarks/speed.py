"""How fast is the tiny M²Chat: training steps per second for each stage, seconds per picture and per story.

    python benchmarks/speed.py [--device auto|cpu|cuda] [--threads N] [--steps 5]

Runs on the shipped system (data/checkpoints/tiny) and prints one table; the same script on a CUDA machine
prints the same table there (with mixed precision where the package uses it). Peak memory is the process's
resident set on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU. Record results in
benchmarks/RESULTS.md with the machine, the date and the command.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from m2chat_lite import fusion, m3ft
from m2chat_lite.cli import DEMO_DIALOGUE, DEMO_STORY
from m2chat_lite.foundation import RECIPE
from m2chat_lite.pipeline import M2ChatPipeline
from m2chat_lite.utils import get_device


def timed(fn, repeats: int, device: str) -> float:
    """Seconds per call of ``fn``, after one warm-up call."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def step_fn(model, loss_fn, batch, params):
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(None if args.device == "auto" else args.device)
    pipe = M2ChatPipeline.from_pretrained(device=device)
    model, tokenizer = pipe.model, pipe.tokenizer
    rows = []

    stage_batches = {
        "fusion (visual questions)": ("stage2", RECIPE["fusion"]["batch_size"],
                                      lambda n: fusion.vqa_batches(tokenizer, model.fused.tokens_per_image, n, pool_size=4 * n)(0),
                                      lambda b: fusion.fusion_loss(model.fused, b)),
        "M³FT stage 1": ("stage1", RECIPE["stage1"]["batch_size"],
                         lambda n: m3ft.alignment_batch(model, tokenizer, m3ft.alignment_examples(n)),
                         lambda b: m3ft.stage1_loss(model, b)[0]),
        "M³FT stage 2": ("stage2", RECIPE["stage2"]["batch_size"],
                         lambda n: fusion.sample_batches(tokenizer, m3ft.stage2_samples(4 * n),
                                                         model.fused.tokens_per_image, n)(0),
                         lambda b: m3ft.stage2_loss(model, b)),
    }
    model.train()
    for name, (stage, batch_size, make, loss_fn) in stage_batches.items():
        params = [p for n, p in model.named_parameters() if n in set(m3ft.set_stage(model, stage))]
        seconds = timed(step_fn(model, loss_fn, make(batch_size), params), args.steps, device)
        rows.append((f"{name}: training step, batch {batch_size}", f"{seconds:.3f} s ({1 / seconds:.2f} steps/s)"))
    model.requires_grad_(False)
    model.eval()

    generator = torch.Generator().manual_seed(0)
    seconds = timed(lambda: pipe.generator(prompt=DEMO_STORY, generator=generator), args.steps, device)
    rows.append(("generator alone: one picture from a caption", f"{seconds:.3f} s"))
    context = pipe.encode([{"role": "user", "content": DEMO_STORY}])
    context.ids += pipe.gen_ids
    seconds = timed(lambda: pipe.draw(context), args.steps, device)
    rows.append(("M²Chat: one picture at an [IMG] span (LM + adapter + generator)", f"{seconds:.3f} s"))
    frames = len(pipe.story(DEMO_STORY)[-1]["content"]) // 2
    seconds = timed(lambda: pipe.story(DEMO_STORY), max(1, args.steps // 2), device)
    rows.append((f"a greedy story (about {frames} frames) from `demo`", f"{seconds:.2f} s"))
    seconds = timed(lambda: pipe.dialogue(DEMO_DIALOGUE), max(1, args.steps // 2), device)
    rows.append(("the 3-turn dialogue from `demo`", f"{seconds:.2f} s"))
    if device == "cuda":
        peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB (GPU)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (resident, CPU)"
    rows.append(("peak memory", peak))

    where = torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"device: {where} · torch {torch.__version__}")
    print(f"| what | time |\n|---|---|")
    for what, value in rows:
        print(f"| {what} | {value} |")


if __name__ == "__main__":
    main()
