"""The ``m2chat-lite`` command line: one small function per subcommand.

Introduced in notebook ``00_welcome``. Subcommands available now:

    m2chat-lite info [--preset NAME]        versions, the device that would be used, the presets
    m2chat-lite data --benchmark [--out D] [--force]   write the frozen ShapeWorld benchmark split
    m2chat-lite data --verify [--out D]    check the split against its manifest
    m2chat-lite train --preset tiny --stage clip|lm|diffusion|foundation|fusion|stage1|stage2|all [--steps N | --minutes M] [--out D] [--threads N]
    m2chat-lite generate --prompt TEXT [--n N] [--seed S] [--out D] [--via generator|m2chat] [--model D]
    m2chat-lite demo [--out page.html] [--story TEXT] [--sample]   an illustrated story and a dialogue, as HTML
    m2chat-lite chat [--out D]             a chat in the terminal; pictures saved as PNG files
    m2chat-lite eval [--suite t2i story dialog chat vqa | all] [--json F] [--limit N]   benchmark scores

To add a subcommand (e.g. ``eval``): write ``add_<name>_parser`` that
registers its arguments and ``set_defaults(handler=run_<name>)``, write ``run_<name>(args) -> int``,
and list the parser in ``SUBCOMMANDS``. Handlers import heavy modules lazily so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .config import PRESETS

EXIT_OK = 0
EXIT_ERROR = 1  # the command ran and failed (bad data, missing file, ...)
EXIT_USAGE = 2  # wrong arguments, or a command that is not available yet (argparse uses 2 too)


def preset_name(value: str) -> str:
    """argparse type for ``--preset``: a known preset name, else an error listing the valid ones."""
    if value not in PRESETS:
        raise argparse.ArgumentTypeError(
            f"unknown preset {value!r}; valid presets: {', '.join(PRESETS)}"
        )
    return value


# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------


def add_info_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info", help="show versions, the device that would be used, and the presets"
    )
    parser.add_argument(
        "--preset", type=preset_name, default=None, help="also print this preset's full config"
    )
    parser.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> int:
    import torch  # lazy: keeps `m2chat-lite --help` fast

    from .utils import get_device

    device = get_device()
    print(f"m2chat-lite {__version__}")
    print(f"python      {platform.python_version()}")
    print(f"torch       {torch.__version__}")
    gpu = f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else ""
    print(f"device      {device}{gpu}")
    print("presets:")
    for name, config in PRESETS.items():
        if config.uses_pretrained:
            source = "pretrained checkpoints, one CUDA GPU"
        else:
            source = "trained from scratch, any CPU"
        print(f"  {name:<10} {config.image_size}px images, {source}")
    if args.preset is not None:
        print(f"config of {args.preset!r}:")
        for key, value in PRESETS[args.preset].to_dict().items():
            print(f"  {key} = {value!r}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def add_data_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="generate ShapeWorld data files")
    parser.add_argument(
        "--benchmark", action="store_true", help="write the frozen benchmark split"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: the checkout's data/benchmark)"
    )
    parser.add_argument(
        "--force", action="store_true", help="rewrite the split even if the folder exists"
    )
    parser.add_argument(
        "--verify", action="store_true", help="only check the split against its manifest"
    )
    parser.set_defaults(handler=run_data)


def run_data(args: argparse.Namespace) -> int:
    if not (args.benchmark or args.verify):
        print(
            "m2chat-lite data: nothing to do; pass --benchmark to write the benchmark split "
            "or --verify to check it",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from .benchmark import DEFAULT_DIR, verify_benchmark, write_benchmark  # lazy: pulls in ShapeWorld

    out = args.out or DEFAULT_DIR
    if args.verify:
        manifest = verify_benchmark(out)
        print(f"{out}: all {len(manifest['files'])} files match the manifest")
        return EXIT_OK
    try:
        write_benchmark(out, overwrite=args.force)
    except FileExistsError as error:
        print(f"m2chat-lite data: {error}", file=sys.stderr)
        return EXIT_ERROR
    manifest = verify_benchmark(out)
    counts = ", ".join(f"{task} {c['test']}+{c['heldout']}" for task, c in manifest["counts"].items())
    print(f"wrote the ShapeWorld benchmark split to {out} ({counts} test+held-out samples, "
          f"{len(manifest['files'])} files)")
    return EXIT_OK


def thread_count(value: str) -> int:
    """argparse type for ``--threads``: a positive whole number."""
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise argparse.ArgumentTypeError(f"--threads takes a positive whole number of CPU threads, not {value!r}")
    return threads


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

TRAIN_STAGES = ("clip", "lm", "diffusion", "foundation", "fusion", "stage1", "stage2", "all")


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train models with the reference recipe")
    parser.add_argument("--preset", type=preset_name, default="tiny", help="preset (only tiny trains from scratch)")
    parser.add_argument("--stage", choices=TRAIN_STAGES, required=True,
                        help="clip, lm, diffusion (needs a clip in --out), foundation (all three), "
                             "fusion (prompt fusion: needs clip and lm in --out), "
                             "stage1 (M³FT stage 1: needs fusion and diffusion in --out), "
                             "stage2 (M³FT stage 2: needs stage1 in --out), all (fusion, stage1, stage2)")
    parser.add_argument("--out", type=Path, default=Path("runs/tiny"),
                        help="output folder (default runs/tiny; the shipped references are data/checkpoints/tiny)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    budget.add_argument("--minutes", type=float, default=None, help="wall-clock budget per stage instead of steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=thread_count, default=None, metavar="N",
                        help="CPU threads (default: torch's, one per core); the manifest records each stage's: "
                             "to reproduce a shipped stage give its count, as another count adds floats in "
                             "another order and trains another model")
    hub = parser.add_argument_group("hf-small (pretrained checkpoints; stage1 and stage2 only)")
    hub.add_argument("--data", type=Path, default=None,
                     help="real training data: a folder of pictures with .txt captions or a JSONL of pairs (stage1), "
                          "VIST .json (with --images) or MMDialog .jsonl or m2chat-lite JSONL (stage2); "
                          "default: ShapeWorld at the preset's image size")
    hub.add_argument("--images", type=Path, default=None, help="the picture folder of a VIST or MMDialog file")
    hub.add_argument("--lm-id", default=None, help="causal LM: hub id or folder (default: the preset's)")
    hub.add_argument("--vision-id", default=None, help="SigLIP/CLIP vision tower: hub id or folder")
    hub.add_argument("--generator-id", default=None, help="Stable Diffusion folder or hub id")
    hub.add_argument("--batch-size", type=int, default=None, help="per process and micro-batch (default: the preset's)")
    hub.add_argument("--image-size", type=int, default=None,
                     help="side of the pictures drawn and trained on (default: the preset's, 256)")
    parser.add_argument("--grad-accum", type=int, default=1, metavar="N",
                        help="micro-batches per optimizer step and process (default 1); under `accelerate launch "
                             "--num_processes P` each step sees P × N of the recipe's batches")
    parser.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.preset != "tiny":
        return run_train_pretrained(args)
    from .foundation import run  # lazy: pulls in torch and the models
    from .training import is_main_process

    records = run(args.stage, args.out, steps=args.steps, minutes=args.minutes, seed=args.seed, device=args.device,
                  grad_accum_steps=args.grad_accum)
    if not is_main_process():  # a data-parallel run: process 0 reports
        return EXIT_OK
    for stage, record in records.items():
        print(f"{stage}: {record['steps']} steps in {record['train_seconds']:.0f} s → {args.out / stage}")
    print(f"manifest: {args.out / 'manifest.json'}")
    return EXIT_OK


def run_train_pretrained(args: argparse.Namespace) -> int:
    """``train --preset hf-small``: M³FT stage 1 or 2 around pretrained checkpoints (``hf.train``)."""
    if args.stage not in ("stage1", "stage2"):
        print(f"m2chat-lite train: the {args.preset!r} preset loads its LM, vision tower and generator; it trains "
              f"--stage stage1 or stage2, not {args.stage!r}", file=sys.stderr)
        return EXIT_USAGE
    if args.minutes is not None:
        print("m2chat-lite train: give the hf-small preset a --steps budget (--minutes is for the tiny recipe)",
              file=sys.stderr)
        return EXIT_USAGE
    from .config import get_config
    from .hf import train as train_pretrained
    from .training import is_main_process

    overrides = {k: v for k, v in {"lm_id": args.lm_id, "vision_id": args.vision_id,
                                   "generator_id": args.generator_id, "image_size": args.image_size}.items()
                 if v is not None}
    out = args.out if args.out != Path("runs/tiny") else Path("runs") / args.preset
    try:
        record = train_pretrained(args.stage, get_config(args.preset, **overrides), out, data=args.data,
                                  images=args.images, steps=args.steps or 1000, batch_size=args.batch_size,
                                  seed=args.seed, device=args.device, grad_accum_steps=args.grad_accum)
    except (FileNotFoundError, ValueError) as error:
        print(f"m2chat-lite train: {error}", file=sys.stderr)
        return EXIT_USAGE
    if is_main_process():
        print(f"{args.stage}: {record['steps']} steps in {record['train_seconds']:.0f} s on {record['device']} "
              f"→ {out / args.stage} (trained weights {record['trained_mb']:.0f} MB, frozen {record['frozen_mb']:.0f} MB)")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="draw pictures for a caption with the diffusion generator")
    parser.add_argument("--prompt", required=True, help='a caption, e.g. "a big red circle at the top left"')
    parser.add_argument("--n", type=int, default=4, help="how many pictures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the PNG files")
    parser.add_argument("--via", choices=("generator", "m2chat"), default="generator",
                        help="generator: the caption through the generator's own text encoder; m2chat: through "
                             "the whole system (the LM reads it and writes [IMG0..K-1], the adapter conditions the "
                             "generator)")
    parser.add_argument("--model", type=Path, default=None,
                        help="a generator folder, or with --via m2chat a system folder (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the recipe's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the recipe's)")
    parser.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        print("m2chat-lite generate: the prompt is empty; describe a picture, e.g. "
              '--prompt "a big red circle at the top left"', file=sys.stderr)
        return EXIT_USAGE
    if args.n < 1:
        print(f"m2chat-lite generate: --n must be at least 1, got {args.n}", file=sys.stderr)
        return EXIT_USAGE
    import torch

    from .diffusion import TinyDiffusionPipeline, reference_pipeline_dir
    from .utils import atomic_write

    kwargs = {k: v for k, v in (("num_inference_steps", args.steps), ("guidance_scale", args.guidance)) if v}
    if args.via == "m2chat":
        from .data import tensor_to_image
        from .pipeline import M2ChatPipeline

        m2chat = M2ChatPipeline.from_pretrained(args.model, device="cpu")
        context = m2chat.encode([{"role": "user", "content": args.prompt}])
        context.ids += m2chat.gen_ids  # the caption pair's reply: the [IMG] span, written for the LM
        images = [tensor_to_image(m2chat.draw(context, seed=args.seed * 1_000_003 + i, **kwargs)[0])
                  for i in range(args.n)]
    else:
        pipeline = TinyDiffusionPipeline.from_pretrained(args.model or reference_pipeline_dir("tiny"))
        generator = torch.Generator().manual_seed(args.seed)
        images = pipeline(prompt=[args.prompt] * args.n, generator=generator, **kwargs)
    args.out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = args.out / f"{args.seed}-{i}.png"
        with atomic_write(path, "wb") as f:
            image.save(f, format="PNG")
        print(path)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


DEMO_STORY = "a small red square"
DEMO_DIALOGUE = ("draw a big green square at the middle left.", "move it to the bottom left.", "make it smaller.")


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="the end-to-end demo: an illustrated story and a dialogue, as HTML")
    parser.add_argument("--preset", type=preset_name, default="tiny", help="preset to run (tiny ships a system)")
    parser.add_argument("--model", type=Path, default=None,
                        help="an M²Chat system folder (default: the shipped one in data/checkpoints/tiny)")
    parser.add_argument("--out", type=Path, default=Path("outputs/m2chat_demo.html"), help="the HTML page to write")
    parser.add_argument("--story", default=DEMO_STORY, help=f'what the story is about (default "{DEMO_STORY}")')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", action="store_true", help="sample the words (default: greedy)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.set_defaults(handler=run_demo)


def _print_conversation(messages: list[dict]) -> None:
    for message in messages:
        content = message["content"]
        segments = [{"type": "text", "text": content}] if isinstance(content, str) else content
        words = " ".join(s["text"] if s["type"] == "text" else "[picture]" for s in segments)
        print(f"  {message['role']:>9}: {words}")


def run_demo(args: argparse.Namespace) -> int:
    if args.preset != "tiny" and args.model is None:
        print(f"m2chat-lite demo: no {args.preset!r} system ships with the package; pass --model DIR "
              "or use --preset tiny", file=sys.stderr)
        return EXIT_USAGE
    import time

    from .pipeline import M2ChatPipeline
    from .ui import save_html

    start = time.perf_counter()
    pipeline = M2ChatPipeline.from_pretrained(args.model, device=None if args.device == "auto" else args.device)
    loaded = time.perf_counter()
    chat = {"do_sample": args.sample, "seed": args.seed}
    story = pipeline.story(args.story, **chat)
    dialogue = pipeline.dialogue(DEMO_DIALOGUE, **chat)
    seconds = time.perf_counter() - start
    print("a story:")
    _print_conversation(story)
    print("a dialogue:")
    _print_conversation(dialogue)
    note = (f"Written by the tiny M²Chat system ({pipeline.model.record.get('stage', 'trained')}) on "
            f"{pipeline.device}, seed {args.seed}, {'sampled' if args.sample else 'greedy'}, in {seconds:.1f} s.")
    save_html([("An illustrated story", story), ("A dialogue with edits", dialogue)], args.out,
              title="m2chat-lite demo", note=note)
    print(f"loaded in {loaded - start:.1f} s, wrote in {seconds - (loaded - start):.1f} s → {args.out}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------

CHAT_HELP = """Type a message and press Enter. Commands:
  /picture PATH   attach a picture to your next message
  /new            start a new conversation
  /quit           leave (or Ctrl-D)"""


def add_chat_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="chat in the terminal; pictures are saved as PNG files")
    parser.add_argument("--model", type=Path, default=None,
                        help="an M²Chat system folder (default: the shipped one in data/checkpoints/tiny)")
    parser.add_argument("--out", type=Path, default=Path("outputs/chat"), help="folder for the pictures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", action="store_true", help="sample the words (default: greedy)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.set_defaults(handler=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    from .pipeline import M2ChatPipeline, user_message
    from .utils import atomic_write

    pipeline = M2ChatPipeline.from_pretrained(args.model, device=None if args.device == "auto" else args.device)
    print(CHAT_HELP)
    messages: list[dict] = []
    picture, saved = None, 0
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return EXIT_OK
        if line in ("/quit", "/exit"):
            return EXIT_OK
        if line == "/new":
            messages, picture = [], None
            print("(a new conversation)")
            continue
        if line.startswith("/picture"):
            path = line[len("/picture"):].strip()
            try:
                from .data import load_image

                picture = load_image(path, size=pipeline.image_size)
                print(f"(attached {path}; now type your message)")
            except (FileNotFoundError, ValueError, TypeError) as error:
                print(f"(cannot use that picture: {error})")
            continue
        if line.startswith("/"):
            print(CHAT_HELP)
            continue
        if not line and picture is None:
            continue
        message = user_message(line, picture)
        try:
            reply = pipeline.chat(messages + [message], do_sample=args.sample, seed=args.seed + len(messages))
        except ValueError as error:
            print(f"(error: {error})")
            continue
        messages += [message, reply.message]
        picture = None
        words = []
        for segment in reply.message["content"]:
            if segment["type"] == "text":
                words.append(segment["text"])
                continue
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / f"picture-{saved:03d}.png"
            with atomic_write(path, "wb") as f:
                segment["image"].save(f, format="PNG")
            saved += 1
            words.append(f"[{path}]")
        print("m2chat> " + " ".join(words))


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="score a system on the frozen benchmark: a table and a JSON file")
    parser.add_argument("--model", type=Path, default=None,
                        help="an M²Chat system folder (default: the shipped one in data/checkpoints/tiny)")
    parser.add_argument("--suite", nargs="+", default=["all"], choices=["t2i", "story", "dialog", "chat", "vqa", "all"],
                        help="which suites (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--split", choices=("test", "heldout"), default="test")
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples of each task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        print(f"m2chat-lite eval: --limit must be at least 1, got {args.limit}", file=sys.stderr)
        return EXIT_USAGE
    from torch import get_num_threads

    from .evaluation import SUITES, format_table, run, save_json
    from .pipeline import M2ChatPipeline

    pipeline = M2ChatPipeline.from_pretrained(args.model, device=None if args.device == "auto" else args.device)
    suites = SUITES if "all" in args.suite else tuple(dict.fromkeys(args.suite))
    results = run(pipeline, suites, split=args.split, limit=args.limit, seed=args.seed)
    results["meta"]["model"] = str(args.model) if args.model is not None else "the shipped system"
    results["meta"]["threads"] = get_num_threads()
    print(format_table(results))
    if args.json:
        save_json(results, args.json)
        print(f"results: {args.json}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_info_parser,
    add_data_parser,
    add_train_parser,
    add_generate_parser,
    add_demo_parser,
    add_chat_parser,
    add_eval_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m2chat-lite",
        description="M²Chat, small: an LM that writes interleaved text and images.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (0 ok, 1 failed, 2 bad usage or not available)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, --version, or a usage error already printed
        code = exit_request.code
        return code if isinstance(code, int) else EXIT_USAGE
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"m2chat-lite {args.command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
