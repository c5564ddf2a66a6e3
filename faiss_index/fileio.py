"""Durable writes and checksums of files: what index folders and nil's run folders share.

A rename is durable only once the folder holding it is fsynced; a file's checksum is its sha256
read in 1 MiB blocks, so large files are never held in memory.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

LOG = logging.getLogger(__name__)

__all__ = ["sha256_file", "fsync_dir", "fsync_tree"]


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder below ``root``, deepest first, then ``root`` itself."""
    root = Path(root)
    for p in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        else:
            fsync_dir(p)
    fsync_dir(root)
