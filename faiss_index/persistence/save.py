"""Saving an index folder atomically (layout: :mod:`faiss_index.persistence.layout`).

The writer builds everything in a temporary folder beside ``out_dir``, fsyncs it, then swaps it
in with renames: a crash leaves the previous index or none, never a half one; a failed write (a
full disk) raises :class:`IndexWriteError` and leaves the previous index as it was. What is
written about the index besides its rows comes from the index itself (:meth:`BaseIndex.state`,
:meth:`BaseIndex.delta_rows`, :meth:`BaseIndex.save_structure`).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import IndexInputError, IndexWriteError
from ..fileio import fsync_dir, fsync_tree, sha256_file
from ..indexes.base import BaseIndex
from .embeddings import adopt_embeddings, keys_array, write_embeddings
from .layout import (
    EMBEDDINGS,
    FORMAT_VERSION,
    MANIFEST,
    MANIFEST_SUM,
    REQUIRED_KEYS,
    STRUCTURE,
    files_under,
    is_index_dir,
)

LOG = logging.getLogger(__name__)

__all__ = ["save_index"]


def save_index(index: BaseIndex, out_dir: str | Path, *, classes: list[str], keys: list[str] | dict | None = None,
               checkpoint_sha256: str | None = None, source: str | None = None,
               extra: dict | None = None, staged: str | Path | None = None) -> Path:
    """Write index to out_dir atomically; return out_dir as a Path.

    classes: one name per class (len == num_classes). keys: one string per stored sample in store
    order (the order ids were first upserted), or a dict {sample id: key}; None stores "".
    extra: more JSON-serialisable manifest entries (top level; may not replace required keys).
    staged: a folder from :func:`staging_folder` whose ``embeddings.zarr`` (:func:`create_embeddings`)
    the caller has filled (e.g. several processes, each its own rows) with the index's rows in
    store order: adopted instead of written; the structure and the manifest are written here, last.
    """
    out = Path(out_dir)
    classes = [str(c) for c in classes]
    if len(classes) != index.num_classes:
        raise IndexInputError(f"classes has {len(classes)} names but the index has {index.num_classes} classes.")
    vectors, labels, ids = (t.detach().cpu() for t in index.store.view())
    n = int(ids.shape[0])
    key_arr = keys_array(keys, ids)
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(REQUIRED_KEYS))
    if clash:
        raise IndexInputError(f"extra may not set reserved manifest keys: {', '.join(clash)}.")
    if out.exists() and not out.is_dir():
        raise IndexInputError(f"{out} exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not is_index_dir(out):
        raise IndexInputError(f"{out} exists, is not empty and is not an index folder; refusing to replace it.")

    state = index.state()
    delta = index.delta_rows().detach().cpu().numpy().astype(np.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = Path(staged) if staged is not None else out.parent / f".{out.name}.tmp-{tag}"
    old = out.parent / f".{out.name}.old-{tag}"
    moved_old = False
    try:
        if staged is None:
            tmp.mkdir()
            write_embeddings(tmp / EMBEDDINGS, vectors.numpy(), labels.numpy(), ids.numpy(), key_arr, delta)
        else:
            adopt_embeddings(tmp / EMBEDDINGS, ids.numpy(), delta)
        (tmp / STRUCTURE).mkdir()
        structure = index.save_structure(tmp / STRUCTURE)
        manifest = {
            "format_version": FORMAT_VERSION,
            "dim": index.dim,
            "metric": "l2",
            "num_classes": index.num_classes,
            "classes": classes,
            "counts": torch.bincount(labels, minlength=index.num_classes).tolist(),
            "count": n,
            "kind": state["kind"],
            "strategy": state["strategy"],
            "params": _jsonable(state["params"]),
            "construct": state["construct"],
            "engine": _jsonable(structure),
            "steps_since_refresh": int(state["steps_since_refresh"]),
            "checkpoint_sha256": checkpoint_sha256,
            "source": source,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **_jsonable(extra),
        }
        manifest["files"] = {rel: sha256_file(tmp / rel) for rel in files_under(tmp)}
        _write_json(tmp / MANIFEST, manifest)
        (tmp / MANIFEST_SUM).write_text(sha256_file(tmp / MANIFEST) + "\n", encoding="utf-8")
        fsync_tree(tmp)
        if out.exists():
            os.rename(out, old)
            moved_old = True
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_old and not out.exists():
            os.rename(old, out)
        if isinstance(exc, OSError):
            kept = "the previous index is unchanged" if out.exists() else "nothing was written"
            raise IndexWriteError(f"cannot write the index to {out} ({exc.strerror or exc}); {kept}.") from exc
        raise
    if moved_old:
        shutil.rmtree(old, ignore_errors=True)
    LOG.info("saved %s index of %d vectors to %s", index.kind, n, out)
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
