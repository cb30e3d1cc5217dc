"""The m2chat-lite command line."""

import shutil
import subprocess
import sys
import types

import pytest

from m2chat_lite import __version__
from m2chat_lite.cli import main
from m2chat_lite.config import PRESETS


def test_info_prints_versions_device_and_presets(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"m2chat-lite {__version__}" in out
    assert "torch" in out and "device" in out
    for name in PRESETS:
        assert name in out


def test_info_with_a_preset_prints_its_config(capsys):
    assert main(["info", "--preset", "hf-small"]) == 0
    assert "generator_id = 'nota-ai/bk-sdm-tiny'" in capsys.readouterr().out


def test_unknown_preset_lists_the_valid_ones(capsys):
    assert main(["info", "--preset", "huge"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'huge'" in err
    for name in PRESETS:
        assert name in err


def test_unknown_subcommand_is_a_usage_error(capsys):
    assert main(["fly"]) == 2
    assert "invalid choice: 'fly'" in capsys.readouterr().err


def test_no_subcommand_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_help_and_version_exit_zero(capsys):
    assert main(["--help"]) == 0
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_demo_refuses_a_preset_that_ships_no_system(capsys):
    assert main(["demo", "--preset", "hf-small"]) == 2
    assert "--model DIR" in capsys.readouterr().err


def test_data_without_an_action_is_a_usage_error(capsys):
    assert main(["data"]) == 2
    assert "--benchmark" in capsys.readouterr().err


def test_console_script_is_installed():
    executable = shutil.which("m2chat-lite")
    if executable is None:
        pytest.skip('console script not installed: run pip install -e ".[dev]"')
    result = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and __version__ in result.stdout
