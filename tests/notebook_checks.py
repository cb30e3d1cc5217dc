"""What a committed course notebook must look like, as plain functions (no pytest needed).

Shared by ``tests/test_notebooks.py`` (one fast test per notebook and check) and
``tools/run_notebooks.py`` (which executes notebooks, writes them back in the ``normalise``d form
these checks expect, and offers ``--check``). One definition of "clean" for both.

Each check takes ``(nb, path)`` and returns a list of problems (empty when fine).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import nbformat

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
CELL_TIMEOUT = 300  # seconds per cell: a hang guard, not a speed test (keep in step with addopts)

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}
MAX_FILE_BYTES = 1_500_000
MAX_OUTPUT_BYTES = 500_000
# Absolute paths of a particular machine have no place in committed outputs (noise, privacy).
LOCAL_PATH = re.compile(r"(/work/|/root/|/tmp/|/home/|/Users/|[A-Za-z]:\\Users\\)")
# Metadata that changes on every run (timestamps, durations) and only churns diffs.
JUNK_CELL_METADATA = ("execution", "papermill", "ExecuteTime")
JUNK_NB_METADATA = ("papermill",)
REQUIRED_PHRASES = ("What you will learn", "Exercise", "Summary")
TEXT_MIME = ("text/plain", "text/html", "text/markdown", "text/latex", "application/json")


def find_notebooks(directory: Path = NOTEBOOK_DIR) -> list[Path]:
    """The course notebooks, ``NN_topic.ipynb``, in teaching order."""
    return sorted(directory.glob("[0-9][0-9]_*.ipynb"))


def read(path) -> nbformat.NotebookNode:
    return nbformat.read(str(path), as_version=4)


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def parameter_names(nb) -> set[str]:
    """Names assigned in the cell tagged ``parameters`` (what papermill can override)."""
    names: set[str] = set()
    for cell in code_cells(nb):
        if "parameters" in cell.metadata.get("tags", []):
            for node in ast.parse(cell.source).body:
                targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
                names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def normalise(nb) -> nbformat.NotebookNode:
    """The committed form: python3 kernelspec, no run timestamps, execution counts 1..n."""
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    for key in JUNK_NB_METADATA:
        nb.metadata.pop(key, None)
    for count, cell in enumerate(code_cells(nb), start=1):
        cell.execution_count = count
        for output in cell.outputs:
            if output.output_type == "execute_result":
                output.execution_count = count
    for cell in nb.cells:
        for key in JUNK_CELL_METADATA:
            cell.metadata.pop(key, None)
    return nb


# --------------------------------------------------------------------------------------------- checks


def check_valid(nb, path):
    try:
        nbformat.validate(nb)
    except nbformat.ValidationError as error:
        return [f"not a valid nbformat 4 notebook: {error.message}"]
    return []


def check_kernel_metadata(nb, path):
    problems = []
    if nb.metadata.get("kernelspec", {}).get("name") != "python3":
        problems.append("metadata.kernelspec.name must be 'python3' (papermill and nbval need it)")
    if nb.metadata.get("language_info", {}).get("name") != "python":
        problems.append("metadata.language_info.name must be 'python' (papermill refuses parameters otherwise)")
    return problems


def check_parameters_cell(nb, path):
    tagged = [c for c in code_cells(nb) if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        return [f"needs exactly one code cell tagged 'parameters', found {len(tagged)}"]
    try:
        names = parameter_names(nb)
    except SyntaxError as error:
        return [f"the parameters cell does not parse: {error}"]
    return [] if names else ["the parameters cell assigns no names"]


def check_title(nb, path):
    first = nb.cells[0] if nb.cells else None
    if first is None or first.cell_type != "markdown" or not first.source.lstrip().startswith("# "):
        return ["the first cell must be a markdown title ('# ...')"]
    return []


def check_sections(nb, path):
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown").lower()
    return [f"the markdown never says {phrase!r}" for phrase in REQUIRED_PHRASES if phrase.lower() not in markdown]


def check_run_time(nb, path):
    for cell in nb.cells:
        text = cell.source.lower()
        if cell.cell_type == "markdown" and "run time" in text and "cpu" in text and "gpu" in text:
            return []
    return ["no markdown cell gives the expected 'Run time' on CPU and on a GPU"]


def check_colab_cell(nb, path):
    from m2chat_lite.utils import COLAB_INSTALL_SNIPPET

    cells = code_cells(nb)
    if not cells or COLAB_INSTALL_SNIPPET.strip() not in cells[0].source:
        return ["the first code cell must hold a copy of m2chat_lite.utils.COLAB_INSTALL_SNIPPET (stale or missing)"]
    return []


def check_executed(nb, path):
    cells = code_cells(nb)
    problems = [f"code cell {i} is empty (delete it)" for i, c in enumerate(cells) if not c.source.strip()]
    counts = [c.execution_count for c in cells]
    if counts != list(range(1, len(cells) + 1)):
        problems.append(f"not committed executed top to bottom: execution counts {counts} (run tools/run_notebooks.py)")
    return problems


def check_no_errors(nb, path):
    return [
        f"code cell {i} has an error output ({o.get('ename')}); tag the cell 'raises-exception' if it is meant to"
        for i, c in enumerate(code_cells(nb))
        if "raises-exception" not in c.metadata.get("tags", [])
        for o in c.outputs
        if o.output_type == "error"
    ]


def check_size(nb, path):
    problems = []
    size = Path(path).stat().st_size
    if size > MAX_FILE_BYTES:
        problems.append(f"file is {size / 1e6:.2f} MB, over {MAX_FILE_BYTES / 1e6} MB")
    for i, cell in enumerate(code_cells(nb)):
        for output in cell.outputs:
            n = len(json.dumps(output))
            if n > MAX_OUTPUT_BYTES:
                problems.append(f"code cell {i} has an output of {n / 1e3:.0f} KB, over {MAX_OUTPUT_BYTES // 1000} KB")
    return problems


def _output_texts(output):
    yield output.get("text", "")
    yield "\n".join(output.get("traceback", []))
    for mime in TEXT_MIME:
        value = output.get("data", {}).get(mime, "")
        yield value if isinstance(value, str) else json.dumps(value)


def check_no_local_paths(nb, path):
    problems = []
    for i, cell in enumerate(code_cells(nb)):
        for output in cell.outputs:
            for text in _output_texts(output):
                match = LOCAL_PATH.search(text)
                if match:
                    line = next(l for l in text.splitlines() if match.group() in l)
                    problems.append(f"code cell {i} output shows a local path: {line.strip()[:120]!r}")
                    break
    return problems


def check_clean_metadata(nb, path):
    junk = [k for k in JUNK_NB_METADATA if k in nb.metadata]
    problems = [f"notebook metadata has {k!r} (run tools/run_notebooks.py)" for k in junk]
    junk = sorted({k for c in nb.cells for k in JUNK_CELL_METADATA if k in c.metadata})
    if junk:
        problems.append(f"cell metadata has run timestamps {junk} (run tools/run_notebooks.py)")
    return problems


CHECKS = {
    "valid": check_valid,
    "kernel_metadata": check_kernel_metadata,
    "parameters_cell": check_parameters_cell,
    "title": check_title,
    "sections": check_sections,
    "run_time": check_run_time,
    "colab_cell": check_colab_cell,
    "executed": check_executed,
    "no_errors": check_no_errors,
    "size": check_size,
    "no_local_paths": check_no_local_paths,
    "clean_metadata": check_clean_metadata,
}


def check_notebook(path) -> list[str]:
    """Every problem of one notebook file, each prefixed by the check's name."""
    try:
        nb = read(path)
    except Exception as error:  # unreadable JSON or nbformat: nothing else can be checked
        return [f"unreadable: {error}"]
    return [f"{name}: {problem}" for name, check in CHECKS.items() for problem in check(nb, path)]
