"""Checkpoints and run-folder files, written atomically: a crash leaves the old file or none."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from nil.errors import NilError


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_torch(obj: Any, path: str | Path) -> None:
    """torch.save through a temp file, fsync and rename."""
    _atomic_write(Path(path), lambda fh: torch.save(obj, fh), "wb")


def save_json(obj: Any, path: str | Path) -> None:
    _atomic_write(Path(path), lambda fh: json.dump(obj, fh, indent=2), "w")


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
