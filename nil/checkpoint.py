"""Checkpoints and run-folder files, written atomically: a crash leaves the old file or none."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from faiss_index.fileio import fsync_dir
from nil.errors import NilError


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    """Write through a temp file beside ``path``, fsync it, rename it over ``path``, fsync the folder.

    On any failure (a full disk included) the temp file is removed and ``path`` is left as it was;
    an OSError becomes a NilError naming the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        err = _os_error(exc)
        if err is not None:
            kept = "the previous file is unchanged" if path.exists() else "nothing was written"
            raise NilError(f"cannot write {path} ({err.strerror or err}); {kept}") from exc
        raise


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: torch.save reports a failed write as a RuntimeError raised while
    handling it (``unexpected pos ...``), so the chain is followed, not only ``exc`` itself."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def save_torch(obj: Any, path: str | Path) -> None:
    """torch.save through a temp file, fsync and rename."""
    _atomic_write(Path(path), lambda fh: torch.save(obj, fh), "wb")


def save_json(obj: Any, path: str | Path) -> None:
    _atomic_write(Path(path), lambda fh: json.dump(obj, fh, indent=2), "w")


def save_text(text: str, path: str | Path) -> None:
    _atomic_write(Path(path), lambda fh: fh.write(text), "w")


def load_checkpoint(path: str | Path) -> dict:
    """Load a nil checkpoint on the CPU, refusing anything that is not one with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise NilError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise NilError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_spec" not in ckpt:
        raise NilError(f"{path} is not a nil checkpoint (no model or model_spec inside)")
    return ckpt
