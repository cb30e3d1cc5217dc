"""Notebook runs in the test suite: marks, the sanitize file, stop-on-first-error, a timing table.

nbval (``--nbval-lax`` in pyproject's addopts) turns every code cell of ``notebooks/*.ipynb`` into a
test item. Here:

* every nbval cell is marked ``slow``, so ``pytest -m "not slow"`` executes no notebook;
* ``notebooks/.nbval_sanitize.cfg`` is used unless ``--nbval-sanitize-with`` is given (set here rather
  than in addopts so the relative path does not depend on the directory pytest is started from);
* once a cell raises, the notebook's remaining cells are skipped instead of failing one by one with
  NameErrors (nbval itself only does this after a timeout); an output mismatch does not stop a run;
* each notebook's run time (kernel start included) is printed in a table at the end. Other tests that
  execute a notebook add theirs with ``record_notebook_time``.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

try:
    from nbval.plugin import IPyNbCell, NbCellError
except ImportError:  # nbval missing: pytest will already complain about --nbval-lax
    IPyNbCell = NbCellError = ()

_times: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # notebook -> [seconds, cells]


@pytest.fixture
def record_notebook_time(request):
    """For tests that execute a notebook themselves (papermill): ``record(label, seconds, cells)``
    adds a row to the timing table."""

    def record(label: str, seconds: float, cells: int) -> None:
        request.node.user_properties.append(("notebook_time", (label, seconds, cells)))

    return record


def pytest_configure(config):
    sanitize = config.rootpath / "notebooks" / ".nbval_sanitize.cfg"
    if getattr(config.option, "nbval_sanitize_with", "unset") is None and sanitize.is_file():
        config.option.nbval_sanitize_with = str(sanitize)


@pytest.hookimpl(tryfirst=True)  # before the -m deselection
def pytest_collection_modifyitems(items):
    for item in items:
        if isinstance(item, IPyNbCell):
            item.add_marker(pytest.mark.slow)


def pytest_runtest_setup(item):
    failed = getattr(item.parent, "m2_failed_cell", None)
    if isinstance(item, IPyNbCell) and failed is not None:
        pytest.skip(f"an earlier cell ({failed}) of this notebook failed")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if isinstance(item, IPyNbCell) and report.failed:
        error = call.excinfo.value if call.excinfo else None
        mismatch = isinstance(error, NbCellError) and str(error) == "Cell outputs differ"
        if not mismatch:  # the kernel state is broken (error, timeout, dead kernel, failed kernel start)
            item.parent.m2_failed_cell = item.name
    return report


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):  # nbval cell: setup (kernel start) + call + teardown (kernel stop)
        _times[path][0] += report.duration
        _times[path][1] += report.when == "call"
    for name, value in report.user_properties:
        if name == "notebook_time" and report.when == "call":
            label, seconds, cells = value
            _times[label][0] += seconds
            _times[label][1] += cells


def pytest_terminal_summary(terminalreporter):
    if not _times:
        return
    terminalreporter.write_sep("-", "notebook run times")
    width = max(len(name) for name in _times)
    terminalreporter.write_line(f"{'notebook':<{width}}  {'seconds':>8}  {'cells':>5}")
    for name, (seconds, cells) in _times.items():
        terminalreporter.write_line(f"{name:<{width}}  {seconds:8.1f}  {cells:5d}")
