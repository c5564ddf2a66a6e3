"""The index folder format: its file names, the manifest's keys, and reading the manifest.

Layout of an index folder::

    manifest.json        format_version, dim, metric, classes, counts, kind, params, files{path: sha256}, ...
    manifest.sha256      sha256 of manifest.json's bytes (a bit flip in the manifest is caught too)
    embeddings.zarr/     vectors (N, D) float32, labels (N,), ids (N,), keys (N,) str, delta_rows
    structure/           faiss files of the approximate structure (CPU copies of GPU indexes)

Only :mod:`faiss_index.persistence` knows these names; everything else goes through its functions
(:func:`is_index_dir`, :func:`read_manifest`, :func:`carried_entries`, ...).
"""
from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

from ..errors import IndexFormatError

LOG = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "MANIFEST", "MANIFEST_SUM", "EMBEDDINGS", "STRUCTURE", "REQUIRED_KEYS",
           "WRITTEN_BY_SAVE", "is_index_dir", "read_manifest", "carried_entries", "staging_folder", "files_under"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_SUM = "manifest.sha256"
EMBEDDINGS = "embeddings.zarr"
STRUCTURE = "structure"
REQUIRED_KEYS = ("format_version", "dim", "metric", "classes", "counts", "count", "kind", "params",
                 "construct", "engine", "checkpoint_sha256", "source", "created", "files")
# Manifest entries save_index writes itself; everything else in a loaded manifest is carried over
# unchanged by a re-save (e.g. the "checkpoint" path `nil index build` records).
WRITTEN_BY_SAVE = frozenset({"format_version", "dim", "metric", "num_classes", "classes", "counts", "count", "kind",
                             "strategy", "params", "construct", "engine", "steps_since_refresh",
                             "checkpoint_sha256", "source", "created", "files"})


def is_index_dir(path: str | Path) -> bool:
    """Whether ``path`` looks like an index folder (it holds a manifest); nothing is verified."""
    return (Path(path) / MANIFEST).is_file()


def carried_entries(manifest: dict) -> dict:
    """The manifest entries a re-save must carry over (``save_index``'s ``extra``)."""
    return {k: v for k, v in manifest.items() if k not in WRITTEN_BY_SAVE}


def staging_folder(out_dir: str | Path) -> Path:
    """A fresh temporary folder name beside ``out_dir`` for :func:`save_index` ``staged`` (not created)."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"


def files_under(root: Path) -> list[str]:
    """Every file below root, as sorted posix paths relative to it."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def read_manifest(index_dir: str | Path) -> dict:
    """The manifest of an index folder, with its format version and required keys checked.

    Raises IndexFormatError naming the problem (no folder, no manifest, not JSON, wrong version,
    a key missing). File checksums are not checked here (see :func:`load_index`).
    """
    folder = Path(index_dir)
    if not folder.is_dir():
        raise IndexFormatError(f"index folder {folder} does not exist.")
    path = folder / MANIFEST
    if not path.is_file():
        raise IndexFormatError(f"{folder} is not an index folder: {MANIFEST} is missing.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFormatError(f"{path} is not valid JSON ({e}).") from e
    if not isinstance(manifest, dict):
        raise IndexFormatError(f"{path} does not hold a JSON object.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(
            f"{path} has format_version {manifest.get('format_version')!r}; this version reads {FORMAT_VERSION}.")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise IndexFormatError(f"{path} lacks required key(s): {', '.join(missing)}.")
    return manifest
