"""How fast is the tiny M²Chat: training steps per second for each stage, seconds per picture and per story.

    python benchmarks/speed.py [--device auto|cpu|cuda] [--threads N] [--steps 5]
    python benchmarks/speed.py --system hf-shapes|all [--hf-batch 4] [--hf-gen-steps 25] [--hf-dir DIR]

Runs on the shipped system (data/checkpoints/tiny) and prints one table; the same script on a CUDA machine
prints the same table there (with mixed precision where the package uses it). Peak memory is the process's
resident set on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU. Record results in
benchmarks/RESULTS.md with the machine, the date and the command.

``--system hf-shapes`` measures the ``hf-small`` preset's real architectures instead (SmolLM2-135M, SigLIP-base,
bk-sdm-tiny) with **random weights** written by ``benchmarks/hf_shapes.py`` (to a temporary folder, or
``--hf-dir``, kept for the next run): M³FT stage 1 and stage 2 steps through the shared training loop (on a GPU:
frozen parts in half precision, autocast) at batch ``--hf-batch``, the activations each keeps for backward,
the parameter memory (``hf.memory_report``), one 256 px picture with ``--hf-gen-steps`` sampling steps from the
generator alone and through LM + adapter, and a short reply of the LM. On a GPU each row's peak is
``torch.cuda.max_memory_allocated`` since that measurement began; on the CPU it is the process's peak
resident set so far. Only speed and memory mean anything with random weights. ``--system all`` prints the
tiny rows, then the hf-shapes rows, in one table; a failed hf-shapes row says why and the exit code is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from m2chat_lite import fusion, m3ft
from m2chat_lite.cli import DEMO_DIALOGUE, DEMO_STORY
from m2chat_lite.foundation import RECIPE
from m2chat_lite.pipeline import M2ChatPipeline
from m2chat_lite.utils import get_device

# Subjects for the 4-frame story of the speed bar, tried in order when the demo's story has another length
FOUR_FRAME_SUBJECTS = ("a large blue circle", "a small green triangle", "a large yellow square", "a small purple circle")


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


def aligned(n: int) -> list:
    """``n`` alignment examples from the recipe's pool: its shares of captions, stories and dialogues (the share
    with a picture before theirs sets the cost of the adapter's visual branch)."""
    return m3ft.alignment_examples(n, tasks=RECIPE["stage1"]["tasks"])


def tiny_rows(device: str, steps: int) -> list[tuple[str, str]]:
    """The tiny system's rows (the shipped checkpoints)."""
    pipe = M2ChatPipeline.from_pretrained(device=device)
    model, tokenizer = pipe.model, pipe.tokenizer
    rows = []
    shipped = {k: v.clone() for k, v in model.state_dict().items()}  # the training steps below move the weights
    anchor = m3ft.lora_weights(model.fused)  # stage 2's L2-SP term pulls the LoRA toward where it started

    stage_batches = {
        # the recipe's step: the visual questions and the rows of the LM's own conversations it rehearses
        "fusion (visual questions + rehearsal)": (
            "stage2", RECIPE["fusion"]["batch_size"],
            lambda n: {"answers": fusion.vqa_batches(tokenizer, model.fused.tokens_per_image, n, pool_size=4 * n)(0),
                       "words": fusion.rehearsal_batches(tokenizer, RECIPE["fusion"]["rehearsal_rows"],
                                                         pipe.max_length, n_per_task=50)(0)},
            lambda b: fusion.fusion_step_loss(model.fused, b)),
        "M³FT stage 1": ("stage1", RECIPE["stage1"]["batch_size"],
                         lambda n: m3ft.alignment_batch(model, tokenizer, aligned(n)),
                         lambda b: m3ft.stage1_loss(model, b, diffusion_rows=RECIPE["stage1"]["diffusion_rows"],
                                                    lambda_reference=RECIPE["stage1"]["lambda_reference"],
                                                    lambda_reference_layout=RECIPE["stage1"]["lambda_reference_layout"],
                                                    reference_cells_weight=RECIPE["stage1"]["reference_cells_weight"]
                                                    )[0]),
        "M³FT stage 2": ("stage2", RECIPE["stage2"]["batch_size"],
                         lambda n: (fusion.sample_batches(tokenizer, m3ft.stage2_samples(4 * n),
                                                          model.fused.tokens_per_image, n)(0),
                                    m3ft.alignment_batch(model, tokenizer,
                                                         aligned(RECIPE["stage2"]["alignment_batch_size"]))),
                         lambda b: m3ft.stage2_objective(model, *b,
                                                         diffusion_rows=RECIPE["stage2"]["diffusion_rows"],
                                                         anchor=anchor,
                                                         anchor_weight=RECIPE["stage2"]["anchor_weight"])[0]),
    }
    model.train()
    for name, (stage, batch_size, make, loss_fn) in stage_batches.items():
        params = [p for n, p in model.named_parameters() if n in set(m3ft.set_stage(model, stage))]
        # stage 1 trains with the frozen LoRA folded into the LM, as m3ft.train_stage1 does
        with fusion.lora_merged(model.fused) if name == "M³FT stage 1" else contextlib.nullcontext():
            seconds = timed(step_fn(model, loss_fn, make(batch_size), params), steps, device)
        rows.append((f"{name}: training step, batch {batch_size}", f"{seconds:.3f} s ({1 / seconds:.2f} steps/s)"))
        if name == "M³FT stage 1":
            rows += cached_stage1_rows(model, tokenizer, batch_size, loss_fn, steps, device)
    model.requires_grad_(False)
    model.load_state_dict(shipped)  # time the story and the dialogue the shipped system writes, as `demo` does
    model.eval()

    generator = torch.Generator().manual_seed(0)
    seconds = timed(lambda: pipe.generator(prompt=DEMO_STORY, generator=generator), steps, device)
    rows.append(("generator alone: one picture from a caption", f"{seconds:.3f} s"))
    context = pipe.encode([{"role": "user", "content": DEMO_STORY}])
    context.ids += pipe.gen_ids
    seconds = timed(lambda: pipe.draw(context), steps, device)
    rows.append(("M²Chat: one picture at an [IMG] span (LM + adapter + generator)", f"{seconds:.3f} s"))
    frames = len(pipe.story(DEMO_STORY)[-1]["content"]) // 2
    seconds = timed(lambda: pipe.story(DEMO_STORY), max(1, steps // 2), device)
    rows.append((f"the greedy story from `demo` ({frames} frames)", f"{seconds:.2f} s"))
    if frames != 4:  # the bar is for 4 frames: the LM decides how many it writes, so find a subject it gives 4
        subject = next((s for s in FOUR_FRAME_SUBJECTS if len(pipe.story(s)[-1]["content"]) // 2 == 4), None)
        if subject is not None:
            seconds = timed(lambda: pipe.story(subject), max(1, steps // 2), device)
            rows.append((f'a greedy 4-frame story ("{subject}")', f"{seconds:.2f} s"))
        else:
            rows.append(("a greedy 4-frame story", f"none of {len(FOUR_FRAME_SUBJECTS)} subjects gave 4 frames"))
    seconds = timed(lambda: pipe.dialogue(DEMO_DIALOGUE), max(1, steps // 2), device)
    rows.append(("the 3-turn dialogue from `demo`", f"{seconds:.2f} s"))
    rows.append(("peak memory", peak_memory(device)))
    return rows


def cached_stage1_rows(model, tokenizer, batch_size: int, loss_fn, steps: int, device: str,
                       sample: int = 512) -> list[tuple[str, str]]:
    """The recipe's cached stage-1 step (the adapter alone, on precomputed LM states: ``m3ft.train_stage1``'s
    ``cached_steps``) and the size of that cache for the recipe's pool, from the mean of ``sample`` examples."""
    r = RECIPE["stage1"]
    items = m3ft.precompute_alignment(model, tokenizer, aligned(sample))
    # a tensor two keys share (a row without a reference stands in its own caption's sequence) is counted once
    per_example = sum(sum({t.data_ptr(): t.numel() * t.element_size() for t in item.values()
                           if isinstance(t, torch.Tensor)}.values()) for item in items) / len(items)
    params = [p for p in model.adapter.parameters() if p.requires_grad]
    # a batch drawn as the recipe draws them (captions, stories and dialogues mixed, most with a picture before
    # theirs): the first examples alone are all captions, with no reference, where the visual branch is skipped
    batch = fusion.cached_batches(len(items), batch_size, 0, items.__getitem__, m3ft.collate_precomputed)(0)
    seconds = timed(step_fn(model, loss_fn, batch, params), steps, device)
    return [(f"M³FT stage 1: cached step (adapter alone, {r['cached_steps']} of the recipe's {r['steps']}), "
             f"batch {batch_size}", f"{seconds:.3f} s ({1 / seconds:.2f} steps/s)"),
            (f"M³FT stage 1: the cache for the recipe's {r['pool_size']:,} examples (tensors, mean of {sample})",
             f"{per_example * r['pool_size'] / 2**20:.0f} MiB ({per_example / 1024:.0f} KiB per example)")]


def peak_memory(device: str) -> str:
    """The peak since the last reset (GPU) or the process's peak resident set (CPU)."""
    if device == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB (GPU)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (resident, CPU)"


def fresh_peak(device: str) -> None:
    """Start a new peak-memory measurement (GPU; the CPU's resident peak cannot be reset)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------------------------
# hf-shapes: the hf-small preset's architectures with random weights
# ---------------------------------------------------------------------------------------------


def hf_rows(device: str, steps: int, batch: int, gen_steps: int, tokens: int, folder: Path | None
            ) -> tuple[list[tuple[str, str]], int]:
    """The hf-shapes rows and how many of them failed."""
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.append(str(Path(__file__).resolve().parent))
    import hf_shapes

    from m2chat_lite import hf
    from m2chat_lite.training import TrainConfig
    from m2chat_lite.utils import autocast_context

    rows, failures = [], 0
    tag = "hf-shapes"

    def attempt(what: str, measure) -> None:
        nonlocal failures
        fresh_peak(device)
        try:
            rows.append((f"{tag} {what}", measure()))
        except Exception as error:  # a row that fails says why; the others still run
            failures += 1
            message = " ".join(str(error).split())[:160]
            rows.append((f"{tag} {what}", f"FAILED: {type(error).__name__}: {message}"))
            print(f"{tag} {what}: FAILED ({type(error).__name__}: {message})", file=sys.stderr, flush=True)
            traceback.print_exc()
        finally:
            fresh_peak(device)

    temporary = None
    if folder is None:
        temporary = tempfile.TemporaryDirectory(prefix="hf_shapes_")
        folder = Path(temporary.name)
    try:
        start = time.perf_counter()
        if hf_shapes.is_complete(folder):
            config, written = hf_shapes.config_for(folder), "reused"
        else:
            config = hf_shapes.save(folder)
            written = f"{time.perf_counter() - start:.1f} s"
        start = time.perf_counter()
        model, tokenizer, generator = hf.build_system(config, device=device)
        rows.append((f"{tag}: write random checkpoints (SmolLM2-135M, SigLIP-base, bk-sdm-tiny) / hf.build_system",
                     f"{written} / {time.perf_counter() - start:.1f} s"))

        for stage in ("stage1", "stage2"):
            m3ft.set_stage(model, stage)
            report = hf.memory_report(model)
            rows.append((f"{tag} parameters, {stage}: trained / frozen / AdamW state",
                         f"{report['trained_mb']:.0f} / {report['frozen_mb']:.0f} / {report['adamw_state_mb']:.0f} MB"))

        pool = max(8, 2 * batch)

        for stage, train in (("stage1", m3ft.train_stage1), ("stage2", m3ft.train_stage2)):
            name = f"M³FT {stage[:5]} {stage[5:]}"

            def activations(stage=stage):
                loss_fn = hf_shapes.stage_loss(model, tokenizer, stage, batch)
                with autocast_context(device):
                    size = hf_shapes.saved_for_backward(model, loss_fn)
                return f"{size / 2**20:,.0f} MiB kept for backward, peak {peak_memory(device)}"

            def training(train=train):
                train(model, tokenizer, TrainConfig(max_steps=1, warmup_steps=1, log_every=1, lr=1e-4),
                      batch_size=batch, pool_size=pool, device=device, progress=False)  # warm-up
                result = train(model, tokenizer, TrainConfig(max_steps=steps, warmup_steps=1, log_every=steps, lr=1e-4),
                               batch_size=batch, pool_size=pool, device=device, progress=False)
                seconds = result.seconds / steps
                return f"{seconds:.3f} s ({1 / seconds:.2f} steps/s), peak {peak_memory(device)}"

            attempt(f"{name}: activations, batch {batch}", activations)
            attempt(f"{name}: training step, batch {batch} (shared loop)", training)
        model.requires_grad_(False)
        model.eval()

        pipe = M2ChatPipeline(model, tokenizer, generator)
        side = generator.image_size

        def generator_alone():
            noise = torch.Generator().manual_seed(0)
            seconds = timed(lambda: generator(prompt=DEMO_STORY, num_inference_steps=gen_steps, generator=noise),
                            steps, device)
            return f"{seconds:.3f} s, peak {peak_memory(device)}"

        def at_img_span():
            context = pipe.encode([{"role": "user", "content": DEMO_STORY}])
            context.ids += pipe.gen_ids
            seconds = timed(lambda: pipe.draw(context, num_inference_steps=gen_steps), steps, device)
            return f"{seconds:.3f} s, peak {peak_memory(device)}"

        def reply():
            messages = [{"role": "user", "content": DEMO_STORY}]
            written = pipe.chat(messages, max_new_tokens=tokens, max_pictures=0).tokens
            seconds = timed(lambda: pipe.chat(messages, max_new_tokens=tokens, max_pictures=0),
                            max(1, steps // 2), device)
            return f"{seconds:.2f} s ({written / seconds:.1f} tokens/s), peak {peak_memory(device)}"

        attempt(f"generator alone: one {side} px picture, {gen_steps} steps, guidance", generator_alone)
        attempt(f"M²Chat: one {side} px picture at an [IMG] span, {gen_steps} steps", at_img_span)
        attempt(f"LM: a reply of up to {tokens} tokens, no picture (decoded without a KV cache)", reply)
    except Exception as error:  # the checkpoints or the system could not be built: nothing else can run
        failures += 1
        rows.append((f"{tag}: build", f"FAILED: {type(error).__name__}: {' '.join(str(error).split())[:160]}"))
        print(f"{tag}: FAILED to build ({type(error).__name__}: {error})", file=sys.stderr, flush=True)
        traceback.print_exc()
    finally:
        if temporary is not None:
            temporary.cleanup()
    return rows, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--system", choices=("tiny", "hf-shapes", "all"), default="tiny",
                        help="tiny (the shipped system, default), hf-shapes (hf-small's architectures, random "
                             "weights) or all (both, one table)")
    parser.add_argument("--hf-batch", type=int, default=4, help="hf-shapes: training batch size (default 4)")
    parser.add_argument("--hf-gen-steps", type=int, default=25, help="hf-shapes: sampling steps per picture")
    parser.add_argument("--hf-tokens", type=int, default=32, help="hf-shapes: tokens in the timed reply")
    parser.add_argument("--hf-dir", type=Path, default=None,
                        help="hf-shapes: folder of the random checkpoints (written if missing, kept; default: a "
                             "temporary folder)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(None if args.device == "auto" else args.device)
    rows, failures = [], 0
    if args.system == "tiny":
        rows += tiny_rows(device, args.steps)
    elif args.system == "all":  # a failure of the tiny rows must not cost the hf-shapes ones
        try:
            rows += tiny_rows(device, args.steps)
        except Exception as error:
            failures += 1
            rows.append(("tiny system", f"FAILED: {type(error).__name__}: {' '.join(str(error).split())[:160]}"))
            print(f"tiny system: FAILED ({type(error).__name__}: {error})", file=sys.stderr, flush=True)
            traceback.print_exc()
    if args.system in ("hf-shapes", "all"):
        fresh_peak(device)
        more, failed = hf_rows(device, args.steps, args.hf_batch, args.hf_gen_steps, args.hf_tokens, args.hf_dir)
        rows += more
        failures += failed

    where = torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"device: {where} · torch {torch.__version__}")
    print(f"| what | time |\n|---|---|")
    for what, value in rows:
        print(f"| {what} | {value} |")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
