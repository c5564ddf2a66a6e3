"""The zarr embedding store of an index folder: ``embeddings.zarr`` with one row per stored sample.

Arrays: ``vectors`` (N, D) float32, ``labels`` (N,) int64, ``ids`` (N,) int64, ``keys`` (N,) str,
in store order, and ``delta_rows`` (M,) int64, the rows changed since the structure was built.
Several processes may fill one store (:func:`create_embeddings`, then :func:`write_embedding_rows`
on disjoint, chunk-aligned row ranges) before :func:`save_index` adopts it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import IndexFormatError, IndexInputError
from .layout import EMBEDDINGS

LOG = logging.getLogger(__name__)

__all__ = ["create_embeddings", "write_embedding_rows", "read_embedding_rows", "write_embeddings",
           "adopt_embeddings", "read_stored_rows", "keys_array", "stored_keys", "keys_by_id"]


def create_embeddings(folder: str | Path, n: int, dim: int, rows_per_chunk: int) -> Path:
    """Create ``folder/embeddings.zarr`` with empty (n, dim) vectors and (n,) labels, ids, keys.

    Writers then fill disjoint row ranges; ranges that start and end on multiples of
    ``rows_per_chunk`` touch disjoint chunk files, so several processes can write at once.
    """
    import zarr  # noqa: PLC0415

    path = Path(folder) / EMBEDDINGS
    path.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(path), mode="w")
    c = max(1, min(n, rows_per_chunk))
    _array(group, "vectors", np.zeros((0, dim), np.float32), chunks=(c, dim), shape=(n, dim))
    _array(group, "labels", np.zeros(0, np.int64), chunks=(c,), shape=(n,))
    _array(group, "ids", np.zeros(0, np.int64), chunks=(c,), shape=(n,))
    _array(group, "keys", np.array([], dtype=object), chunks=(c,), text=True, shape=(n,))
    return path


def write_embedding_rows(folder: str | Path, start: int, vectors: np.ndarray, labels: np.ndarray, ids: np.ndarray,
                         keys: list[str]) -> None:
    """Fill rows ``[start, start + B)`` of a store made by :func:`create_embeddings` in ``folder``.

    vectors (B, D) float32, labels (B,) int, ids (B,) int, keys: B strings.
    """
    import zarr  # noqa: PLC0415

    group = zarr.open_group(str(Path(folder) / EMBEDDINGS), mode="r+")
    stop = start + len(ids)
    group["vectors"][start:stop] = vectors
    group["labels"][start:stop] = labels
    group["ids"][start:stop] = ids
    group["keys"][start:stop] = np.array([str(k) for k in keys], dtype=object)


def read_embedding_rows(folder: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids (N,), vectors (N, D), labels (N,) of the store in ``folder``, in store order."""
    import zarr  # noqa: PLC0415

    group = zarr.open_group(str(Path(folder) / EMBEDDINGS), mode="r")
    return np.asarray(group["ids"][:]), np.asarray(group["vectors"][:]), np.asarray(group["labels"][:])


def adopt_embeddings(path: Path, ids: np.ndarray, delta: np.ndarray) -> None:
    """Check that a staged embeddings.zarr holds the index's rows; add the delta rows."""
    import zarr  # noqa: PLC0415

    group = zarr.open_group(str(path), mode="r+")
    if not np.array_equal(np.asarray(group["ids"][:]), ids):
        raise IndexInputError(f"the staged {path} does not hold the index's samples in store order.")
    _array(group, "delta_rows", delta, chunks=(max(1, min(len(delta), 1 << 20)),))


def write_embeddings(path: Path, vectors, labels, ids, keys, delta) -> None:
    """Write a whole store at ``path``: numpy rows in store order, keys (N,) object, delta rows (M,)."""
    import zarr  # noqa: PLC0415

    group = zarr.open_group(str(path), mode="w")
    n, d = vectors.shape
    _array(group, "vectors", np.ascontiguousarray(vectors, dtype=np.float32), chunks=(max(1, min(n, 65536)), d))
    _array(group, "labels", labels.astype(np.int64), chunks=(max(1, min(n, 1 << 20)),))
    _array(group, "ids", ids.astype(np.int64), chunks=(max(1, min(n, 1 << 20)),))
    _array(group, "keys", keys, chunks=(max(1, min(n, 1 << 18)),), text=True)
    _array(group, "delta_rows", delta, chunks=(max(1, min(len(delta), 1 << 20)),))


def read_stored_rows(path: Path) -> dict:
    """vectors, labels, ids, delta (numpy) and keys_shape of the store at ``path``; IndexFormatError if unreadable."""
    import zarr  # noqa: PLC0415

    try:
        group = zarr.open_group(str(path), mode="r")
        return {"vectors": np.asarray(group["vectors"][...]), "labels": np.asarray(group["labels"][...]),
                "ids": np.asarray(group["ids"][...]), "keys_shape": group["keys"].shape,
                "delta": np.asarray(group["delta_rows"][...])}
    except Exception as e:  # zarr raises many types for broken stores
        raise IndexFormatError(f"{path} cannot be read ({type(e).__name__}: {e}).") from e


def keys_array(keys, ids: torch.Tensor) -> np.ndarray:
    """(N,) object array of keys in store order from a list, a dict {sample id: key} or None ("")."""
    n = int(ids.shape[0])
    if keys is None:
        return np.array([""] * n, dtype=object)
    if isinstance(keys, dict):
        return np.array([str(keys.get(i, "")) for i in ids.tolist()], dtype=object)
    keys = list(keys)
    if len(keys) != n:
        raise IndexInputError(f"keys has {len(keys)} entries but the index stores {n} samples.")
    return np.array([str(k) for k in keys], dtype=object)


def stored_keys(index_dir: str | Path, n: int) -> np.ndarray:
    """The (n,) object array of sample keys saved in an index folder, in store order."""
    import zarr  # noqa: PLC0415

    keys = zarr.open_group(str(Path(index_dir) / EMBEDDINGS), mode="r")["keys"][...]
    out = np.empty(n, dtype=object)
    out[:] = [str(k) for k in np.asarray(keys).tolist()] if n else []
    return out


def keys_by_id(index_dir: str | Path) -> dict[int, str]:
    """{sample id: key} of every sample saved in an index folder."""
    import zarr  # noqa: PLC0415

    group = zarr.open_group(str(Path(index_dir) / EMBEDDINGS), mode="r")
    return dict(zip(np.asarray(group["ids"][:]).tolist(), (str(k) for k in group["keys"][:])))


def _array(group, name: str, data: np.ndarray, chunks, text: bool = False, shape: tuple | None = None) -> None:
    shape = data.shape if shape is None else shape  # a larger shape leaves the array to be filled later
    if hasattr(group, "create_array"):  # zarr >= 3
        arr = group.create_array(name, shape=shape, dtype=str if text else data.dtype, chunks=chunks,
                                 compressors=None if not text else "auto")
    else:  # zarr 2
        kw = {}
        if text:
            import numcodecs  # noqa: PLC0415

            kw = {"dtype": object, "object_codec": numcodecs.VLenUTF8()}
        arr = group.create_dataset(name, shape=shape, chunks=chunks, dtype=kw.pop("dtype", data.dtype), **kw)
    if data.size:
        arr[...] = data
