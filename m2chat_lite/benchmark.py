"""The frozen ShapeWorld benchmark split that every evaluation in the course uses.

Taught in notebook ``01_shapeworld``; scored in ``10_evaluation_and_ablations``. ``m2chat-lite data
--benchmark`` writes it once into ``data/benchmark/``: one JSONL file per task with its pictures, and a
``manifest.json`` holding the sha256 of every file, so a changed or damaged split is caught by
``verify_benchmark`` before it can silently change a reported number.

Each task has two parts, told apart by ``meta["split"]``:
- ``test``: fresh scenes from the training distribution, drawn from a seed training never uses;
- ``heldout``: every item contains a colour–shape pair that training never shows (composition).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from . import __version__
from .data import Sample, read_jsonl, write_jsonl
from .utils import DATA_DIR, sha256_file
from .world.samples import make_samples

BENCHMARK_SEED = 2311_17963  # the paper's arXiv id; training code never uses this seed
BENCHMARK_IMAGE_SIZE = 32
BENCHMARK_COUNTS = {  # task -> (test, heldout)
    "caption": (300, 100),
    "story": (100, 50),
    "dialogue": (100, 50),
    "vqa": (300, 100),
}
DEFAULT_DIR = DATA_DIR / "benchmark"
COMMAND = "m2chat-lite data --benchmark"


def training_seed(step: int, seed: int = 0) -> int:
    """The data seed of training batch ``step`` of a run seeded ``seed``: distinct per step and never the
    benchmark's, so a batch drawn fresh for every step never repeats the benchmark's scenes by seed."""
    value = 1_000_003 * (seed + 1) + step
    return value if value != BENCHMARK_SEED else value + 7_919_000_000


def benchmark_samples(task: str) -> list[Sample]:
    """The benchmark's samples for ``task``, generated (not read): the test part, then the held-out part."""
    n_test, n_heldout = BENCHMARK_COUNTS[task]
    test = make_samples(task, n_test, BENCHMARK_SEED, "train", BENCHMARK_IMAGE_SIZE)
    for s in test:  # the training distribution, from a seed training never uses
        s.id, s.meta["split"] = s.id.replace("-train-", "-test-"), "test"
    return test + make_samples(task, n_heldout, BENCHMARK_SEED, "heldout", BENCHMARK_IMAGE_SIZE)


def write_benchmark(out_dir=DEFAULT_DIR, overwrite: bool = False) -> Path:
    """Write the split and its manifest to ``out_dir`` (built in a temporary folder, then moved in)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; the benchmark is written once. Check it with "
                              f"verify_benchmark, or pass overwrite=True (--force) to write it again")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".benchmark-", dir=out_dir.parent))
    try:
        for task in BENCHMARK_COUNTS:
            write_jsonl(benchmark_samples(task), tmp / f"{task}.jsonl", image_dir=f"images/{task}")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "command": COMMAND,
            "package_version": __version__,
            "seed": BENCHMARK_SEED,
            "image_size": BENCHMARK_IMAGE_SIZE,
            "counts": {task: {"test": t, "heldout": h} for task, (t, h) in BENCHMARK_COUNTS.items()},
            "files": {p.relative_to(tmp).as_posix(): sha256_file(p) for p in files},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the split is for everyone to read
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def verify_benchmark(root=DEFAULT_DIR) -> dict:
    """Check every file against the manifest; returns the manifest, or raises naming what differs."""
    root = Path(root)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no benchmark manifest at {manifest_path}; write the split with `{COMMAND}`")
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{manifest_path} is not a valid benchmark manifest ({e}); rewrite it with "
                         f"`{COMMAND} --force`") from e
    problems = []
    for rel, digest in expected.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"missing {rel}")
        elif sha256_file(path) != digest:
            problems.append(f"changed {rel}")
    extra = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - set(expected) - {"manifest.json"}
    problems += [f"unexpected {rel}" for rel in sorted(extra)]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"the benchmark in {root} does not match its manifest: {shown}. Restore it with "
                         f"`git checkout -- {root}` or rewrite it with `{COMMAND} --force`")
    return manifest


def load_benchmark(task: str, root=DEFAULT_DIR, split: str | None = None, verify: bool = True,
                   **read_kwargs) -> list[Sample]:
    """The frozen benchmark samples of ``task`` (optionally only ``split`` 'test' or 'heldout')."""
    if task not in BENCHMARK_COUNTS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(BENCHMARK_COUNTS)}")
    if split not in (None, "test", "heldout"):
        raise ValueError(f"unknown benchmark split {split!r}; valid: test, heldout (or None for both)")
    if verify:
        verify_benchmark(root)
    samples = read_jsonl(Path(root) / f"{task}.jsonl", **read_kwargs)
    return [s for s in samples if split is None or s.meta["split"] == split]
