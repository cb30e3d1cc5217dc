"""pyproject.toml, environment.yml, README and .ci/run agree with each other."""

import importlib
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
yaml = pytest.importorskip("yaml")
from packaging.requirements import Requirement  # noqa: E402  (pytest depends on packaging)
from packaging.utils import canonicalize_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOCAL_TORCH = "2.13.0"  # the CPU wheel .ci/run installs


@pytest.fixture(scope="module")
def project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _requirements(project):
    runtime = [Requirement(r) for r in project["dependencies"]]
    dev = [Requirement(r) for r in project["optional-dependencies"]["dev"]]
    return runtime, dev


def _setup_commands():
    """The command lines in the first ``bash`` block of the README's "Set up" section."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Set up", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block, "README's 'Set up' section must have a ```bash block with the set-up commands"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_dependencies_have_lower_bounds_only(project):
    runtime, dev = _requirements(project)
    for req in runtime + dev:
        operators = {spec.operator for spec in req.specifier}
        assert operators == {">="}, f"{req}: use a lower bound only (>=), no pins or upper bounds"


def test_torch_bound_admits_the_local_cpu_wheel(project):
    runtime, _ = _requirements(project)
    (torch_req,) = [r for r in runtime if r.name == "torch"]
    assert torch_req.specifier.contains(LOCAL_TORCH)
    assert torch_req.specifier.contains(LOCAL_TORCH + "+cpu")


def test_version_comes_from_the_package(project):
    import m2chat_lite

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" in project["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "m2chat_lite.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", m2chat_lite.__version__)


def test_console_script_points_at_a_callable(project):
    target = project["scripts"]["m2chat-lite"]
    assert target == "m2chat_lite.cli:main"
    module_name, function_name = target.split(":")
    assert callable(getattr(importlib.import_module(module_name), function_name))


def test_environment_yml_installs_every_dependency(project):
    env = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    conda_deps = [d for d in env["dependencies"] if isinstance(d, str)]
    assert any(d.replace(" ", "").startswith("python>=3.10") for d in conda_deps)
    assert "pip" in conda_deps
    (pip_section,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    pip_lines = [line.replace('"', "").replace("'", "") for line in pip_section]

    installs_project_with_dev = any(
        re.fullmatch(r"(-e|--editable)\s*=?\s*\.\[dev\]", line) for line in pip_lines
    )
    if installs_project_with_dev:
        return  # `-e .[dev]` installs exactly pyproject's runtime and dev dependencies
    listed = {canonicalize_name(Requirement(line).name) for line in pip_lines if not line.startswith("-")}
    runtime, dev = _requirements(project)
    missing = {canonicalize_name(r.name) for r in runtime + dev} - listed
    assert not missing, f"environment.yml does not install: {sorted(missing)}"


def test_readme_setup_commands_are_what_ci_runs():
    commands = _setup_commands()
    assert commands == ['pip install -e ".[dev]"', "pytest"]
    ci_script = ROOT / ".ci" / "run"
    assert ci_script.stat().st_mode & 0o111, ".ci/run must be executable"
    ci_lines = [
        line.strip()
        for line in ci_script.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert "set -euo pipefail" in ci_lines
    positions = []
    for command in ["pip install torch==" + LOCAL_TORCH] + commands:
        matching = [i for i, line in enumerate(ci_lines) if line.endswith(command)]
        assert matching, f".ci/run does not run the README command {command!r}"
        positions.append(matching[0])
    assert positions == sorted(positions), ".ci/run must pin torch, then install, then test"


def test_pytest_config(project):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    options = pyproject["tool"]["pytest"]["ini_options"]
    assert options["testpaths"] == ["tests", "notebooks"]
    assert any(marker.startswith("slow:") for marker in options["markers"])
