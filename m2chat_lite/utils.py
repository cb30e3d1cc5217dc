"""Small helpers every notebook uses: seeds, device, mixed precision, safe file writes, timing.

Taught in notebook ``00_welcome`` (setup) and used from then on. Nothing here knows about models:
it is the plumbing that makes runs repeatable (``set_seed``), portable (``get_device``,
``autocast_context``) and safe to interrupt (``atomic_write``: a file is either the old one or the
complete new one, never half-written).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np
import torch

REPO_URL = "https://github.com/m2chat-lite/m2chat-lite"
# The checkout's data/ folder: the benchmark split, sample files in the real-data layouts and the
# reference checkpoints. The course runs from a checkout (an editable install), locally and in Colab.
DATA_DIR = Path(__file__).resolve().parent.parent / "data"

# The text of every notebook's first cell. It must work before the package is installed, so it
# spells the URL out instead of importing REPO_URL, and it uses plain Python (no ``!pip``) so that it
# also runs outside IPython.
COLAB_INSTALL_SNIPPET = f'''\
# In Google Colab: fetch the course (package, data, reference checkpoints) and install it.
# Anywhere else this cell does nothing.
import os, subprocess, sys
if "google.colab" in sys.modules and not os.path.isdir("/content/m2chat-lite"):
    subprocess.run(["git", "clone", "--depth", "1", "{REPO_URL}", "/content/m2chat-lite"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-e", "/content/m2chat-lite"], check=True)
if "google.colab" in sys.modules:
    sys.path.insert(0, "/content/m2chat-lite")  # the editable install is not on this kernel's path yet
    os.chdir("/content/m2chat-lite/notebooks")
'''

_DEVICE_CHOICES = ("auto", "cpu", "cuda")


# ---------------------------------------------------------------------------------------------
# Reproducibility and hardware
# ---------------------------------------------------------------------------------------------


def set_seed(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (and every CUDA device, if any); return a seeded CPU generator.

    Pass the returned generator to sampling code (``torch.randn(..., generator=g)``) when a cell's
    output must not depend on what ran before it.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy's legacy seeding only accepts 32-bit seeds
    torch.manual_seed(seed)  # also seeds every CUDA device
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch.Generator().manual_seed(seed)


def get_device(prefer: str | torch.device | None = None) -> str:
    """Return the device to run on: ``"cuda"`` when a GPU is present, else ``"cpu"``.

    ``prefer`` may be ``None`` or ``"auto"`` (detect), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    Asking for CUDA on a machine without it is an error rather than a silent fallback, so a notebook
    parameter ``device="cuda"`` never quietly trains on the CPU.
    """
    choice = "auto" if prefer is None else str(prefer).strip().lower()
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return "cpu"
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {prefer!r} was requested but PyTorch sees no CUDA GPU "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}). "
                'Use device="auto" or "cpu", or run on a machine with a GPU (e.g. Colab with a '
                "GPU runtime) and a CUDA build of PyTorch."
            )
        if choice != "cuda":
            index = choice.split(":", 1)[1]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise RuntimeError(
                    f"device {prefer!r} does not exist: this machine has "
                    f"{torch.cuda.device_count()} CUDA device(s), numbered from 0."
                )
        return choice
    raise ValueError(
        f"unknown device {prefer!r}; choose one of {', '.join(_DEVICE_CHOICES)} (or 'cuda:N')."
    )


def _device_type(device: str | torch.device) -> str:
    return torch.device(device).type


def amp_dtype(device: str | torch.device) -> torch.dtype:
    """The mixed-precision compute dtype for ``device``.

    bfloat16 on GPUs that support it (Ampere and newer), float16 on older GPUs such as Colab's T4
    (train those with a ``torch.amp.GradScaler``), and float32 on the CPU, meaning "no mixed
    precision".
    """
    if _device_type(device) == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast_context(device: str | torch.device, cpu_bf16: bool = False) -> contextlib.AbstractContextManager:
    """``torch.autocast`` with :func:`amp_dtype` on CUDA; on the CPU a do-nothing context, or with
    ``cpu_bf16`` a bfloat16 autocast (faster where the CPU has bfloat16 matrix units, Intel AMX: see
    :func:`cpu_has_bf16`)."""
    device_type = _device_type(device)
    if device_type == "cuda":
        return torch.autocast(device_type="cuda", dtype=amp_dtype(device))
    if cpu_bf16 and device_type == "cpu":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_has_bf16() -> bool:
    """True when this CPU computes bfloat16 matrix products in hardware (Intel AMX tiles, as on Sapphire
    Rapids and newer Xeons), where a bfloat16 autocast trains the tiny models about a quarter faster.
    Elsewhere bfloat16 on a CPU is emulated and slower than float32."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def cpu_has_bf16_instructions(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """True when this CPU has bfloat16 instructions of any kind: AMX tiles (:func:`cpu_has_bf16`) or the vector
    ones, AVX512-BF16 (AMD Zen 4 and newer, Intel Cooper Lake), read from ``/proc/cpuinfo`` (False where there is
    none, as on macOS). There a bfloat16 autocast halves the tiny generator's sampling time with the same oracle
    scores (this course's 2-core AMD EPYC: ``benchmarks/M2CHAT_RECIPE.md``, "Drawn references join the recipe");
    training stays in float32 unless :func:`cpu_has_bf16`, where it was measured faster."""
    if cpu_has_bf16():
        return True
    try:
        flags = Path(cpuinfo).read_text(errors="ignore")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def in_colab() -> bool:
    """True when running inside Google Colab."""
    return "google.colab" in sys.modules


# ---------------------------------------------------------------------------------------------
# Files: never leave a half-written file behind
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str = "utf-8") -> Iterator[IO]:
    """Open ``path`` for writing so that it only appears, complete, when the block succeeds.

    Writes go to a temporary file in the same directory, which is flushed, synced and then moved
    over ``path`` with ``os.replace`` (atomic on POSIX and Windows). If the block raises, the
    temporary file is deleted and ``path`` keeps its old content (or stays absent). Missing parent
    directories are created. ``mode`` is ``"w"`` (text) or ``"wb"`` (bytes).
    """
    if mode not in ("w", "wt", "wb"):
        raise ValueError(f"atomic_write supports mode 'w' (text) or 'wb' (bytes), got {mode!r}")
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"cannot write to {str(target)!r}: it is a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp_path = Path(tmp_name)
    try:
        binary = "b" in mode
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _copy_permissions(target, tmp_path)
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _copy_permissions(target: Path, tmp_path: Path) -> None:
    """Give the new file the old file's mode, or the usual mode for a new file (mkstemp uses 0600)."""
    if target.exists():
        os.chmod(tmp_path, target.stat().st_mode & 0o7777)
    else:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "w", encoding=encoding) as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as pretty, key-sorted JSON to ``path`` atomically, ending with a newline."""
    text = json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_text(path, text)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, but atomic: an interrupted save leaves the old checkpoint intact."""
    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (for checkpoint and data manifests)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


class Timer:
    """Measure wall-clock time of a block, so notebooks can print how long a step took.

    >>> with Timer("training") as timer:
    ...     pass
    >>> timer.elapsed >= 0
    True

    ``elapsed`` is live inside the block and frozen once it ends; ``str(timer)`` reads
    ``"training: 0.00 s"``.
    """

    def __init__(self, label: str = "elapsed", verbose: bool = False):
        self.label = label
        self.verbose = verbose
        self._start: float | None = None
        self._end: float | None = None

    def __enter__(self) -> "Timer":
        self._start = time.perf_counter()
        self._end = None
        return self

    def start(self) -> "Timer":
        """Start without a ``with`` block (a notebook's first cell starts it, its last cell prints it)."""
        return self.__enter__()

    def __exit__(self, *exc_info) -> None:
        self._end = time.perf_counter()
        if self.verbose:
            print(self)

    @property
    def elapsed(self) -> float:
        """Seconds since the block started (or its total duration once it has ended)."""
        if self._start is None:
            return 0.0
        end = self._end if self._end is not None else time.perf_counter()
        return end - self._start

    def __str__(self) -> str:
        return f"{self.label}: {self.elapsed:.2f} s"

    def __repr__(self) -> str:
        return f"Timer(label={self.label!r}, elapsed={self.elapsed:.3f})"
