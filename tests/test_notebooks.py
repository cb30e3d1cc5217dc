"""The notebooks as a test suite.

* fast: the structural checks of ``notebook_checks.py`` on every committed ``notebooks/NN_*.ipynb``
  (one test per notebook and check), and unit tests of those checks and of ``tools/run_notebooks.py``;
* slow: papermill runs of notebooks with *other* parameters (``ALTERNATE_PARAMETERS``), and end-to-end
  runs of the tooling on synthetic notebooks. The plain top-to-bottom run of every notebook with its
  default parameters is nbval's job (``--nbval-lax`` in pyproject.toml, see conftest.py).
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

import notebook_checks  # tests/notebook_checks.py (tests/ is on sys.path: pytest's default import mode)
from m2chat_lite.utils import COLAB_INSTALL_SNIPPET
from notebook_checks import CHECKS, NOTEBOOK_DIR, REPO_ROOT, find_notebooks, parameter_names

# Papermill runs with parameters other than the notebook's defaults (another preset, a device, ...):
# notebook stem -> {parameter: value}, or a list of such dicts for several runs. Every name must be
# assigned in the notebook's `parameters` cell. Notebooks not listed here are skipped.
ALTERNATE_PARAMETERS: dict[str, dict | list[dict]] = {
    "00_welcome": {"device": "cpu"},
    "01_shapeworld": {"image_size": 64, "oracle_scenes": 200},
    "02_tiny_clip": {"seed": 1, "max_steps": 20, "batch_size": 32, "device": "cpu"},
    "03_language_model": {"seed": 1, "max_steps": 40, "rows": 2, "device": "cpu"},
    "04_diffusion": {"seed": 1, "max_steps": 15, "batch_size": 8, "eval_prompts": 10, "device": "cpu"},
    "05_multimodal_prompt_fusion": {"seed": 1, "max_steps": 10, "batch_size": 8, "tokens_per_image": 4,
                                    "eval_questions": 20, "device": "cpu"},
    "06_m3adapter": {"seed": 1, "max_steps": 4, "batch_size": 4, "gate_mode": "static", "eval_prompts": 8,
                     "device": "cpu"},
    "07_m3ft_stage1_alignment": {"seed": 1, "max_steps": 4, "batch_size": 4, "learning_rate": 1e-3,
                                 "eval_prompts": 8, "device": "cpu"},
    "08_m3ft_stage2_instruction": {"seed": 1, "max_steps": 4, "batch_size": 4, "eval_samples": 8, "device": "cpu"},
    "09_interleaved_chat": {"seed": 1, "story_subject": "a big blue circle", "temperature": 1.2, "device": "cpu"},
    "10_evaluation_and_ablations": {"seed": 1, "eval_limit": 3, "eval_captions": 6, "device": "cpu"},
    "11_scaling_up": {"seed": 1, "steps": 2, "batch_size": 3, "checkpoints": "stand-ins", "device": "cpu"},
}

NOTEBOOKS = find_notebooks()
NO_NOTEBOOKS = [pytest.param(None, marks=pytest.mark.skip(reason="no notebooks in notebooks/ yet"))]


@functools.lru_cache(maxsize=None)
def _read(path: Path) -> nbformat.NotebookNode:
    return notebook_checks.read(path)


# --------------------------------------------------------------------------------------------- structure


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("path", NOTEBOOKS or NO_NOTEBOOKS, ids=lambda p: getattr(p, "stem", None))
def test_notebook_structure(path, check):
    try:
        nb = _read(path)
    except Exception as error:
        pytest.fail(f"{path.name} is unreadable: {error}")
    problems = CHECKS[check](nb, path)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


# --------------------------------------------------------------------------------------------- papermill


def unknown_parameters(nb, parameters: dict) -> str | None:
    """A clear message when ``parameters`` names something the parameters cell does not define
    (papermill would only warn and run with the defaults)."""
    known = parameter_names(nb)
    unknown = sorted(set(parameters) - known)
    if unknown:
        return f"unknown parameter(s) {unknown}; the notebook's parameters cell defines {sorted(known)}"
    return None


def run_papermill(path: Path, parameters: dict, output_dir: Path, timeout: float):
    """Execute ``path`` with ``parameters`` on a fresh python3 kernel (cwd = its folder) into ``output_dir``;
    returns the executed notebook and the wall time in seconds."""
    import papermill

    message = unknown_parameters(notebook_checks.read(path), parameters)
    if message:
        raise ValueError(f"{path.name}: {message}")
    start = time.perf_counter()
    nb = papermill.execute_notebook(
        str(path),
        str(output_dir / path.name),
        parameters=parameters,
        kernel_name="python3",
        cwd=str(path.parent),
        execution_timeout=timeout,
        progress_bar=False,
    )
    return nb, time.perf_counter() - start


def _alternate_runs():
    stems = sorted({p.stem for p in NOTEBOOKS} | set(ALTERNATE_PARAMETERS))
    for stem in stems:
        runs = ALTERNATE_PARAMETERS.get(stem)
        if runs is None:
            yield pytest.param(stem, None, id=stem, marks=pytest.mark.skip(reason="not in ALTERNATE_PARAMETERS"))
            continue
        for parameters in runs if isinstance(runs, list) else [runs]:
            label = ",".join(f"{k}={v}" for k, v in parameters.items())
            yield pytest.param(stem, parameters, id=f"{stem}[{label}]")


NO_RUNS = [pytest.param(None, None, marks=pytest.mark.skip(reason="no notebooks yet"))]
ALTERNATE_RUNS = list(_alternate_runs()) or NO_RUNS


@pytest.mark.slow
@pytest.mark.parametrize("stem, parameters", ALTERNATE_RUNS)
def test_notebook_with_alternate_parameters(stem, parameters, tmp_path, request, record_notebook_time):
    path = NOTEBOOK_DIR / f"{stem}.ipynb"
    if not path.is_file():
        pytest.skip(f"{path.name} is not written yet")
    if parameters.get("device") == "cuda":
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
    message = unknown_parameters(_read(path), parameters)
    if message:
        pytest.fail(f"ALTERNATE_PARAMETERS[{stem!r}]: {message}")
    nb, seconds = run_papermill(path, parameters, tmp_path, request.config.getoption("nbval_cell_timeout"))
    cells = len(notebook_checks.code_cells(nb))
    print(f"{path.name} with {parameters}: {seconds:.1f} s, {cells} code cells")
    record_notebook_time(f"{path.relative_to(REPO_ROOT)} (papermill {parameters})", seconds, cells)


# --------------------------------------------------------------------------------------------- the tooling


def make_notebook(*extra_cells, parameters="image_size = 32\nseed = 0") -> nbformat.NotebookNode:
    """A small notebook that follows the course conventions (unexecuted)."""
    nb = new_notebook(
        cells=[
            new_markdown_cell("# 99 · A synthetic notebook\n\n## What you will learn\n\n- nothing"),
            new_markdown_cell("**Run time:** about 1 s on a CPU, less on a GPU."),
            new_code_cell(COLAB_INSTALL_SNIPPET),
            new_code_cell(parameters, metadata={"tags": ["parameters"]}),
            new_code_cell("print('image size', image_size)"),
            *extra_cells,
            new_markdown_cell("## Exercise\n\nNone.\n\n## Summary\n\nDone."),
        ],
        metadata={"language_info": {"name": "python"}, "kernelspec": dict(notebook_checks.KERNELSPEC)},
    )
    return nb


def executed(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Pretend ``nb`` was run: execution counts set, as the checks want."""
    for count, cell in enumerate(notebook_checks.code_cells(nb), start=1):
        cell.execution_count = count
    return nb


def save(nb, path: Path) -> Path:
    nbformat.write(nb, str(path))
    return path


def load_tool():
    spec = importlib.util.spec_from_file_location("run_notebooks", REPO_ROOT / "tools" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checks_pass_on_a_conforming_notebook(tmp_path):
    path = save(executed(make_notebook()), tmp_path / "99_synthetic.ipynb")
    assert notebook_checks.check_notebook(path) == []


@pytest.mark.parametrize(
    "damage, check, phrase",
    [
        (lambda nb: nb.metadata.pop("language_info"), "kernel_metadata", "language_info"),
        (lambda nb: nb.metadata["kernelspec"].update(name="other"), "kernel_metadata", "python3"),
        (lambda nb: nb.cells[3].metadata.update(tags=[]), "parameters_cell", "found 0"),
        (lambda nb: nb.cells[4].metadata.update(tags=["parameters"]), "parameters_cell", "found 2"),
        (lambda nb: nb.cells.pop(0), "title", "markdown title"),
        (lambda nb: nb.cells.pop(), "sections", "'Summary'"),
        (lambda nb: nb.cells.pop(1), "run_time", "Run time"),
        (lambda nb: setattr(nb.cells[2], "source", COLAB_INSTALL_SNIPPET[:-30]), "colab_cell", "COLAB_INSTALL_SNIPPET"),
        (lambda nb: setattr(nb.cells[4], "execution_count", None), "executed", "execution counts"),
        (lambda nb: nb.cells.insert(5, new_code_cell("", execution_count=4)), "executed", "empty"),
        (
            lambda nb: nb.cells[4].outputs.append(new_output("error", ename="ValueError", evalue="x", traceback=[])),
            "no_errors",
            "ValueError",
        ),
        (
            lambda nb: nb.cells[4].outputs.append(new_output("stream", name="stderr", text="/root/x.py:3: Warn\n")),
            "no_local_paths",
            "/root/x.py",
        ),
        (
            lambda nb: nb.cells[4].outputs.append(new_output("display_data", data={"text/plain": "x" * 600_000})),
            "size",
            "KB",
        ),
        (lambda nb: nb.cells[4].metadata.update(execution={"iopub.status.idle": "t"}), "clean_metadata", "execution"),
        (lambda nb: nb.metadata.update(papermill={"duration": 1.0}), "clean_metadata", "papermill"),
    ],
)
def test_each_check_catches_its_defect(tmp_path, damage, check, phrase):
    nb = executed(make_notebook())
    damage(nb)
    path = save(nb, tmp_path / "99_synthetic.ipynb")
    problems = [p for p in notebook_checks.check_notebook(path) if p.startswith(f"{check}:")]
    assert problems and phrase in "\n".join(problems), notebook_checks.check_notebook(path)


def test_an_error_output_is_allowed_in_a_cell_tagged_raises_exception(tmp_path):
    cell = new_code_cell("raise ValueError('bad input')", metadata={"tags": ["raises-exception"]})
    nb = executed(make_notebook(cell))
    nb.cells[5].outputs.append(new_output("error", ename="ValueError", evalue="bad input", traceback=[]))
    assert notebook_checks.check_notebook(save(nb, tmp_path / "99_synthetic.ipynb")) == []


def test_normalise_gives_the_committed_form():
    nb = make_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["papermill"] = {"duration": 3.2}
    for count, cell in zip([7, 9, 12], notebook_checks.code_cells(nb)):
        cell.execution_count = count
        cell.metadata["execution"] = {"iopub.execute_input": "2025-01-01T00:00:00"}
        cell.metadata["papermill"] = {"status": "completed"}
    nb.cells[4].outputs = [new_output("execute_result", data={"text/plain": "1"}, execution_count=12)]
    notebook_checks.normalise(nb)
    assert nb.metadata["kernelspec"] == notebook_checks.KERNELSPEC
    assert nb.metadata["language_info"] == {"name": "python"}
    assert "papermill" not in nb.metadata
    assert [c.execution_count for c in notebook_checks.code_cells(nb)] == [1, 2, 3]
    assert nb.cells[4].outputs[0].execution_count == 3
    assert all(not set(c.metadata) & {"execution", "papermill"} for c in nb.cells)


def test_parameter_names_and_unknown_parameters():
    nb = make_notebook(parameters="preset = 'tiny'  # the scale\nseed: int = 0\nsteps = budget = 10\n")
    assert parameter_names(nb) == {"preset", "seed", "steps", "budget"}
    assert unknown_parameters(nb, {"seed": 1}) is None
    message = unknown_parameters(nb, {"sede": 1})
    assert "unknown parameter(s) ['sede']" in message and "'seed'" in message


def test_tool_check_mode_reports_problems(tmp_path, capsys):
    tool = load_tool()
    good = save(executed(make_notebook()), tmp_path / "98_good.ipynb")
    bad = save(make_notebook(), tmp_path / "99_bad.ipynb")  # never executed
    assert tool.main(["--check", str(good)]) == 0
    assert tool.main(["--check", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "99_bad.ipynb: executed: not committed executed" in out and "98_good.ipynb:" not in out


def _pytest_project(tmp_path: Path) -> Path:
    """A copy of this repo's pytest set-up (ini options, conftest, sanitize file) around tmp_path/notebooks."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    options = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    ini = ["[pytest]", f"addopts = {options['addopts']} -p no:cacheprovider", "markers ="]
    ini += [f"    {marker}" for marker in options["markers"]]
    (tmp_path / "pytest.ini").write_text("\n".join(ini) + "\n")
    (tmp_path / "conftest.py").write_text((REPO_ROOT / "conftest.py").read_text())
    (tmp_path / "notebooks").mkdir()
    sanitize = NOTEBOOK_DIR / ".nbval_sanitize.cfg"
    (tmp_path / "notebooks" / sanitize.name).write_text(sanitize.read_text())
    return tmp_path / "notebooks"


def _pytest(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}  # the kernel imports m2chat_lite even if not installed
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-rA", "--color=no", *args],
        cwd=project, env=env, capture_output=True, text=True, timeout=300,
    )


def test_fast_tier_runs_no_notebook_cell(tmp_path):
    notebooks = _pytest_project(tmp_path)
    save(executed(make_notebook()), notebooks / "99_synthetic.ipynb")
    result = _pytest(notebooks.parent, "-m", "not slow", "--collect-only", "-q")
    assert "3 deselected" in result.stdout, result.stdout + result.stderr
    assert "Cell" not in result.stdout.split("deselected")[0]


@pytest.mark.slow
def test_tool_executes_in_place_and_keeps_a_failing_notebook(tmp_path, capsys):
    tool = load_tool()
    nb = make_notebook(new_code_cell("import os\nprint(os.path.basename(os.getcwd()))"))
    nb.metadata["kernelspec"]["display_name"] = "Python 3 (ipykernel)"
    good = save(nb, tmp_path / "98_good.ipynb")
    bad = save(make_notebook(new_code_cell("1 / 0")), tmp_path / "99_bad.ipynb")
    before = bad.read_bytes()
    assert tool.main([str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "ok     98_good.ipynb" in out and "FAILED 99_bad.ipynb" in out and "ZeroDivisionError" in out
    assert "total" in out and "1 / 0" in out
    assert bad.read_bytes() == before  # untouched
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    result = nbformat.read(str(good), as_version=4)
    assert notebook_checks.check_notebook(good) == []
    assert result.metadata["kernelspec"] == notebook_checks.KERNELSPEC
    assert result.metadata["language_info"]["name"] == "python" and "version" in result.metadata["language_info"]
    assert result.cells[4].outputs[0]["text"] == "image size 32\n"
    assert result.cells[5].outputs[0]["text"] == f"{tmp_path.name}\n"  # cwd = the notebook's folder


@pytest.mark.slow
def test_papermill_runs_with_other_parameters(tmp_path):
    path = save(make_notebook(), tmp_path / "99_synthetic.ipynb")
    (tmp_path / "out").mkdir()
    nb, seconds = run_papermill(path, {"image_size": 64}, tmp_path / "out", timeout=60)
    assert seconds > 0
    printed = [o for c in notebook_checks.code_cells(nb) for o in c.outputs if o.get("name") == "stdout"]
    assert printed[-1]["text"] == "image size 64\n"
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['imagesize'\]"):
        run_papermill(path, {"imagesize": 64}, tmp_path / "out", timeout=60)


FIGURE = "import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0])\nplt.show()"


@pytest.mark.slow
def test_nbval_lax_checks_marked_cells_ignores_pictures_and_stops_after_an_error(tmp_path):
    notebooks = _pytest_project(tmp_path)
    # good: a checked figure whose stored PNG is another picture, a checked Timer line and address.
    good = make_notebook(
        new_code_cell("# NBVAL_CHECK_OUTPUT\n" + FIGURE),
        new_code_cell("# NBVAL_CHECK_OUTPUT\nfrom m2chat_lite.utils import Timer\nwith Timer('step') as t:\n    pass\n"
                      "print(t, object())"),
        new_code_cell("print('unchecked output', __import__('random').random())"),
    )
    # mismatch: a checked cell whose stored text differs; the next cells still run.
    mismatch = make_notebook(new_code_cell("# NBVAL_CHECK_OUTPUT\nprint('new')"), new_code_cell("print('after')"))
    # broken: the parameters cell raises; the cells after it are skipped, not failed.
    broken = make_notebook(new_code_cell("print('never')"), parameters="image_size = undefined_name")
    for name, nb in [("97_good", good), ("98_mismatch", mismatch), ("99_broken", broken)]:
        save(nb, notebooks / f"{name}.ipynb")
    tool = load_tool()
    assert tool.main([str(notebooks / "97_good.ipynb"), str(notebooks / "98_mismatch.ipynb")]) == 0
    good = nbformat.read(str(notebooks / "97_good.ipynb"), as_version=4)
    figure = good.cells[5].outputs[0]
    assert set(figure.data) == {"image/png", "text/plain"} and figure.data["text/plain"].startswith("<Figure size")
    figure.data["image/png"] = base64.b64encode(b"some other picture" * 10).decode()
    good.cells[6].outputs[0]["text"] = "step: 9.99 s <object object at 0x7f0000000000>\n"
    save(good, notebooks / "97_good.ipynb")
    mismatch = nbformat.read(str(notebooks / "98_mismatch.ipynb"), as_version=4)
    mismatch.cells[5].outputs[0]["text"] = "old\n"
    save(mismatch, notebooks / "98_mismatch.ipynb")

    result = _pytest(notebooks.parent)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert all(f"PASSED notebooks/97_good.ipynb::Cell {i}" in out for i in range(6)), out
    assert "FAILED notebooks/98_mismatch.ipynb::Cell 3" in out and "PASSED notebooks/98_mismatch.ipynb::Cell 4" in out
    assert "FAILED notebooks/99_broken.ipynb::Cell 1" in out
    assert "an earlier cell (Cell 1) of this notebook failed" in out
    assert "2 failed, 11 passed, 2 skipped" in out
    table = out.split("notebook run times")[1]
    assert "notebooks/97_good.ipynb" in table and "notebooks/99_broken.ipynb" in table
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:] if line.startswith("notebooks/")}
    assert rows["notebooks/97_good.ipynb"][1] == "6" and rows["notebooks/99_broken.ipynb"][1] == "2"
    assert float(rows["notebooks/97_good.ipynb"][0]) > 0
