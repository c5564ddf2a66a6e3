"""Loading an index folder, every file checked first; :func:`index_stats` describes one from its manifest.

The reader checks the manifest's own checksum, every file's checksum, that no file is present
that the manifest does not list, and the array shapes, and refuses anything else with
:class:`IndexFormatError`. The index itself is remade from the manifest's ``construct``
arguments and refilled with :meth:`BaseIndex.load_state`: rows are stored in store order, so
faiss ids (store rows) stay valid and a loaded index answers exactly like the saved one.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import IndexFormatError, IndexInputError
from ..indexes.base import BaseIndex
from .checksums import check_manifest_sum, verify_files
from .embeddings import read_stored_rows
from .layout import EMBEDDINGS, MANIFEST, STRUCTURE, is_index_dir, read_manifest

LOG = logging.getLogger(__name__)

__all__ = ["load_index", "index_stats"]


def load_index(index_dir: str | Path, device: str | torch.device = "cpu") -> tuple[BaseIndex, dict]:
    """Load a saved index onto device; return (index, manifest).

    Raises IndexFormatError naming the problem if the folder is missing, the manifest is
    invalid, a file is missing or corrupt, or the arrays disagree with the manifest.
    """
    from ..indexes.factory import make_index  # noqa: PLC0415 - avoids an import cycle

    folder = Path(index_dir)
    if folder.is_dir() and is_index_dir(folder):
        check_manifest_sum(folder)
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    dim, counts, n = manifest["dim"], manifest["counts"], manifest["count"]
    classes = manifest["classes"]
    if not isinstance(dim, int) or dim <= 0:
        raise IndexFormatError(f"{folder / MANIFEST} has an invalid dim {dim!r}.")
    if not isinstance(classes, list) or not classes or len(counts) != len(classes):
        raise IndexFormatError(f"{folder / MANIFEST}: counts has {len(counts)} entries for {len(classes)} classes.")
    if sum(counts) != n:
        raise IndexFormatError(f"{folder / MANIFEST}: counts sum to {sum(counts)} but count is {n}.")
    rows = read_stored_rows(folder / EMBEDDINGS)
    vectors, labels, ids, delta = rows["vectors"], rows["labels"], rows["ids"], rows["delta"]
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise IndexFormatError(f"stored vectors have shape {vectors.shape} but the manifest says dim {dim}.")
    for name, shape in (("vectors", vectors.shape[:1]), ("labels", labels.shape), ("ids", ids.shape),
                        ("keys", tuple(rows["keys_shape"]))):
        if tuple(shape) != (n,):
            raise IndexFormatError(f"stored {name} hold {shape[0] if shape else '?'} rows but the manifest says {n}.")
    if n and (labels.min() < 0 or labels.max() >= len(classes)):
        raise IndexFormatError("stored labels fall outside the manifest's classes.")
    if np.bincount(labels, minlength=len(classes)).tolist() != list(counts):
        raise IndexFormatError("stored labels disagree with the manifest's per-class counts.")
    if delta.size and (delta.min() < 0 or delta.max() >= n):
        raise IndexFormatError("stored delta rows fall outside the stored rows.")

    try:
        index = make_index(manifest["kind"], dim, len(classes), device, **manifest["construct"])
    except IndexInputError as e:
        raise IndexFormatError(f"{folder / MANIFEST} describes an index that cannot be made: {e}") from e
    index.load_state(torch.from_numpy(vectors), torch.from_numpy(labels), torch.from_numpy(ids),
                     structure=manifest["engine"], folder=folder / STRUCTURE, delta_rows=torch.from_numpy(delta),
                     steps_since_refresh=int(manifest.get("steps_since_refresh", 0)))
    return index, manifest


def index_stats(index_dir: str | Path) -> dict:
    """Summary of a saved index from its manifest: count, counts, kind, params, dim, bytes, ..."""
    folder = Path(index_dir)
    manifest = read_manifest(folder)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {
        "count": manifest["count"], "counts": manifest["counts"], "kind": manifest["kind"],
        "params": manifest["params"], "dim": manifest["dim"], "bytes": size,
        "classes": manifest["classes"], "strategy": manifest.get("strategy"), "created": manifest["created"],
        "checkpoint_sha256": manifest["checkpoint_sha256"], "source": manifest["source"],
        "format_version": manifest["format_version"],
    }
