"""Seeds, device choice, mixed precision, atomic writes, hashing and timing in m2chat_lite.utils."""

import contextlib
import hashlib
import random

import numpy as np
import pytest
import torch

from m2chat_lite import utils
from m2chat_lite.utils import (
    COLAB_INSTALL_SNIPPET,
    REPO_URL,
    Timer,
    amp_dtype,
    atomic_torch_save,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    autocast_context,
    get_device,
    in_colab,
    set_seed,
    sha256_file,
)


def _draw(generator):
    return (
        random.random(),
        np.random.rand(3).tolist(),
        torch.rand(3).tolist(),
        torch.rand(3, generator=generator).tolist(),
    )


def test_set_seed_makes_every_source_repeatable():
    first = _draw(set_seed(123))
    second = _draw(set_seed(123))
    other = _draw(set_seed(124))
    assert first == second
    assert first != other


def test_set_seed_returns_a_generator_and_rejects_bad_seeds():
    assert isinstance(set_seed(0), torch.Generator)
    for bad in (-1, 1.5, "0", True):
        with pytest.raises(ValueError, match="seed"):
            set_seed(bad)


def test_get_device_on_a_cpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_device() == get_device("auto") == get_device("cpu") == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        get_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        get_device("tpu")


def test_get_device_prefers_cuda_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_device() == "cuda"
    assert get_device("cpu") == "cpu"


def test_mixed_precision_is_off_on_cpu():
    assert amp_dtype("cpu") == torch.float32
    assert isinstance(autocast_context("cpu"), contextlib.nullcontext)


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_dtype_on_cuda(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert amp_dtype("cuda") == expected


def test_atomic_write_writes_text_and_bytes(tmp_path):
    atomic_write_text(tmp_path / "a" / "b.txt", "héllo")
    assert (tmp_path / "a" / "b.txt").read_text(encoding="utf-8") == "héllo"
    atomic_write_bytes(tmp_path / "c.bin", b"\x00\x01")
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    atomic_write_json(tmp_path / "d.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "d.json").read_text().startswith('{\n  "a"')


def test_atomic_write_keeps_old_content_on_exception(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(path) as handle:
            handle.write("half of the new content")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]  # temp file removed


def test_atomic_write_leaves_no_file_on_exception(tmp_path):
    path = tmp_path / "new.txt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as handle:
            handle.write("partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_rejects_append_and_read_modes(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "x", "a"):
            pass


def test_atomic_torch_save_round_trip(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"w": torch.arange(3)}, path)
    assert torch.equal(torch.load(path)["w"], torch.arange(3))


def test_sha256_file(tmp_path):
    path = tmp_path / "blob"
    data = b"m2chat" * 100_000
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path, chunk_size=7) == hashlib.sha256(data).hexdigest()


def test_colab_snippet_is_a_no_op_outside_colab(monkeypatch):
    assert not in_colab()
    assert REPO_URL in COLAB_INSTALL_SNIPPET and '"google.colab" in sys.modules' in COLAB_INSTALL_SNIPPET
    calls = []
    monkeypatch.setattr("subprocess.run", lambda *args, **kwargs: calls.append(args))
    exec(compile(COLAB_INSTALL_SNIPPET, "<colab cell>", "exec"), {})
    assert calls == []


def test_colab_snippet_installs_from_github_in_colab(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert in_colab()
    calls = []
    monkeypatch.setattr("subprocess.run", lambda command, **kwargs: calls.append(command))
    monkeypatch.setattr("os.chdir", lambda path: calls.append(["chdir", path]))
    monkeypatch.setattr("sys.path", list(sys.path))
    exec(compile(COLAB_INSTALL_SNIPPET, "<colab cell>", "exec"), {})
    assert calls[0][:2] == ["git", "clone"] and REPO_URL in calls[0]
    assert calls[1][-2:] == ["-e", "/content/m2chat-lite"]
    assert calls[2] == ["chdir", "/content/m2chat-lite/notebooks"]


def test_timer_measures_elapsed_time(monkeypatch):
    clock = iter([10.0, 12.5])
    monkeypatch.setattr(utils.time, "perf_counter", lambda: next(clock))
    with Timer("training") as timer:
        pass
    assert timer.elapsed == 2.5
    assert str(timer) == "training: 2.50 s"
