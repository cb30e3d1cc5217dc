"""Model folders: written whole or not at all, loaded strictly, with errors that say what to do.

Used by every model module (encoders, backbone, diffusion, and later the whole M²Chat system). A
checkpoint is a ``save_pretrained`` folder (``config.json`` + safetensors, plus a tokenizer where there
is one), so the ecosystem's tools can open it too.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError


def save_folder(folder, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary folder beside ``folder``, then move it into place.

    If ``write`` fails, nothing changes on disk; an existing ``folder`` is replaced only on success.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_pretrained(model_class, folder, what: str, how_to_make: str, **kwargs):
    """``model_class.from_pretrained(folder)``, refusing anything but an exact match of weights and config.

    ``what`` names the model in messages ("the tiny CLIP"); ``how_to_make`` tells the user how to get a
    good folder (a command).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no {what} (config.json is missing); {how_to_make}")
    try:
        model, info = model_class.from_pretrained(folder, local_files_only=True, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        reason = ("its weights do not match its config (tensor shapes differ)" if "mismatched" in str(error)
                  else f"{error}. The folder is incomplete or damaged")
        raise ValueError(f"cannot load {what} from {folder}: {reason}; {how_to_make}") from error
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys", "unexpected_keys") and v}
    if problems:
        raise ValueError(f"cannot load {what} from {folder}: its weights do not match its config ({problems}); "
                         f"{how_to_make}")
    return model.eval()
