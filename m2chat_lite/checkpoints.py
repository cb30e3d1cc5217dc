"""Model folders: written whole or not at all, loaded strictly, with errors that say what to do.

Used by every model module (encoders, backbone, diffusion, and later the whole M²Chat system). A
checkpoint is a ``save_pretrained`` folder (``config.json`` + safetensors, plus a tokenizer where there
is one), so the ecosystem's tools can open it too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError
from transformers.utils import logging as hf_logging


def save_folder(folder, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary folder beside ``folder``, then move it into place.

    ``folder`` is always either the old checkpoint or the complete new one: if ``write`` or the move
    fails, the old one stays. Files get the usual permissions (temporary folders are private).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    old = None
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        for path in tmp.rglob("*"):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not folder.exists():
            os.replace(old, folder)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


@contextlib.contextmanager
def quiet():
    """No ``transformers`` progress bars (writing or loading weights) inside the block."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_pretrained(model_class, folder, what: str, how_to_make: str, **kwargs):
    """``model_class.from_pretrained(folder)``, refusing anything but an exact match of weights and config.

    ``what`` names the model in messages ("the tiny CLIP"); ``how_to_make`` tells the user how to get a
    good folder (a command).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no {what} (config.json is missing); {how_to_make}")
    try:
        with quiet():
            model, info = model_class.from_pretrained(folder, local_files_only=True, output_loading_info=True,
                                                      **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        reason = ("its weights do not match its config (tensor shapes differ)" if "mismatched" in str(error)
                  else f"{error}. The folder is incomplete or damaged")
        raise ValueError(f"cannot load {what} from {folder}: {reason}; {how_to_make}") from error
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys", "unexpected_keys") and v}
    if problems:
        raise ValueError(f"cannot load {what} from {folder}: its weights do not match its config ({problems}); "
                         f"{how_to_make}")
    return model.eval()
