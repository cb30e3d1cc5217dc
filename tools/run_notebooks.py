"""Execute course notebooks in place on a fresh kernel, the way they are committed.

Usage (from anywhere)::

    python tools/run_notebooks.py                      # every notebooks/NN_*.ipynb
    python tools/run_notebooks.py notebooks/01_shapeworld.ipynb
    python tools/run_notebooks.py --timeout 600 ...    # seconds per cell (default 300)
    python tools/run_notebooks.py --check [NOTEBOOK ...]   # structural checks only, no execution

Each notebook runs top to bottom with its default parameters (the CPU ones CI uses) on a fresh
``python3`` kernel whose working directory is the notebook's folder. Only when every cell succeeds is
the file rewritten (atomically) in the committed form: kernelspec ``python3``, ``language_info`` as
the kernel reports it, no per-cell timing or papermill metadata, execution counts 1..n. Then the
structural checks of ``tests/notebook_checks.py`` (the same ones ``pytest`` runs) are applied.

Prints each notebook's wall time and the total; exits 1 if any notebook failed (the failing cell and
its traceback are shown, the file is left untouched) or has a structural problem.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

# The checks live with the tests (tests/ and tools/ are not packages): one definition for both.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import notebook_checks  # noqa: E402

from m2chat_lite.utils import atomic_write_text  # noqa: E402


def execute(path: Path, timeout: float) -> nbformat.NotebookNode:
    """Run ``path`` on a fresh python3 kernel (cwd = its folder); raises on the first failing cell."""
    nb = notebook_checks.read(path)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,  # no per-cell timestamps in committed files
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    return nb


def write(nb: nbformat.NotebookNode, path: Path) -> None:
    text = nbformat.writes(nb)
    atomic_write_text(path, text if text.endswith("\n") else text + "\n")


def report_problems(path: Path) -> bool:
    problems = notebook_checks.check_notebook(path)
    for problem in problems:
        print(f"  {path.name}: {problem}")
    return not problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/NN_*.ipynb")
    parser.add_argument("--timeout", type=float, default=notebook_checks.CELL_TIMEOUT, help="seconds per cell")
    parser.add_argument("--check", action="store_true", help="only run the structural checks, execute nothing")
    args = parser.parse_args(argv)

    paths = [p.resolve() for p in args.notebooks] or notebook_checks.find_notebooks()
    if not paths:
        print(f"no notebooks found in {notebook_checks.NOTEBOOK_DIR}")
        return 0
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")

    if args.check:
        ok = [report_problems(p) for p in paths]
        print(f"{sum(ok)}/{len(paths)} notebooks pass the structural checks")
        return 0 if all(ok) else 1

    failed, total = [], 0.0
    for path in paths:
        print(f"running {path.name} ...", flush=True)
        start = time.perf_counter()
        try:
            nb = execute(path, args.timeout)
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as error:
            seconds = time.perf_counter() - start
            total += seconds
            print(f"FAILED {path.name} after {seconds:.1f} s (file left unchanged)\n{error}\n", flush=True)
            failed.append(path.name)
            continue
        seconds = time.perf_counter() - start
        total += seconds
        write(notebook_checks.normalise(nb), path)
        print(f"ok     {path.name}: {seconds:.1f} s, {len(notebook_checks.code_cells(nb))} code cells", flush=True)
        if not report_problems(path):
            failed.append(path.name)

    print(f"total {total:.1f} s for {len(paths)} notebook(s)")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
