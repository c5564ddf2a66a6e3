"""A zarr patch store, streamed chunk by chunk: large sets (millions of patches) never fit in memory.

Layout of the group: ``images`` uint8 ``(N, H, W, C)`` chunked along N, ``labels`` int ``(N,)``,
optional ``keys`` ``(N,)`` strings and ``ids`` ``(N,)`` int; optional attribute ``classes``.
Reads go through a small LRU cache of decoded chunks, so reading in chunk order (see
``ChunkShuffleSampler``) costs one decode per chunk. Works with zarr 3 and zarr 2.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import zarr

from nil.data.base import Dataset, SampleSet
from nil.data.splits import seeded_dataset
from nil.errors import NilError

LOG = logging.getLogger(__name__)


class IndexKeys(Sequence[str]):
    """Keys ``"0".."N-1"`` without holding N strings."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [str(k) for k in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return str(i % self.n)


def open_group(path: str | Path):
    """The zarr group at ``path`` opened read-only, NilError when it is not one."""
    try:
        return zarr.open_group(str(path), mode="r")
    except Exception as err:  # zarr raises several types across versions for "not a group"
        raise NilError(f"{path}: cannot open as a zarr group ({err})") from err


class ZarrSampleSet(SampleSet):
    """The images of a zarr store, read through an LRU cache of ``cache_chunks`` decoded chunks.

    Picklable (for DataLoader workers): the zarr handle and the cache are reopened per process.
    """

    def __init__(self, path: str | Path, labels: np.ndarray, ids: np.ndarray,
                 keys: Sequence[str], cache_chunks: int = 8):
        super().__init__(labels, ids, keys)
        self.path, self.cache_chunks = str(path), cache_chunks
        self._images = None
        self._pid = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.decodes = 0  # chunks decoded by this process (for tests and benchmarks)
        self._chunk = int(self._array().chunks[0])

    def _array(self):
        if self._images is None or self._pid != os.getpid():
            self._images = open_group(self.path)["images"]
            self._pid = os.getpid()
            self._cache = OrderedDict()
        return self._images

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_images=None, _pid=None, _cache=OrderedDict())
        return state

    def chunk_size(self) -> int:
        return self._chunk

    def _block(self, c: int) -> np.ndarray:
        """Chunk ``c`` decoded, through the LRU cache."""
        images = self._array()
        block = self._cache.get(c)
        if block is None:
            block = np.asarray(images[c * self._chunk:(c + 1) * self._chunk])
            self.decodes += 1
            self._cache[c] = block
            if len(self._cache) > self.cache_chunks:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(c)
        return block

    def load(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._block(i // self._chunk)[i % self._chunk]

    def load_many(self, index: np.ndarray) -> list[np.ndarray]:
        """One decode per distinct chunk (not per image): scattered rows are read chunk by chunk."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) and not (0 <= index.min() and index.max() < len(self)):
            raise IndexError(f"positions must lie in [0, {len(self)})")
        out: list[np.ndarray | None] = [None] * len(index)
        chunks = index // self._chunk
        for c in np.unique(chunks):
            block = self._block(int(c))
            for j in np.flatnonzero(chunks == c):
                out[j] = block[index[j] % self._chunk]
        return out  # type: ignore[return-value]

    def random_reader(self, cache_bytes: int) -> "ZarrSampleSet":
        """A copy with its own cache of up to ``cache_bytes`` of decoded chunks (at least the
        loader's), so scattered reads neither thrash nor evict the chunk the loader is reading."""
        reader = copy.copy(self)  # through __getstate__: its own zarr handle and an empty cache
        reader.decodes = 0
        images = self._array()
        chunk_bytes = self._chunk * int(np.prod(images.shape[1:])) * images.dtype.itemsize
        reader.cache_chunks = max(self.cache_chunks, int(cache_bytes) // max(chunk_bytes, 1))
        return reader


def _read_1d(group, name: str, n: int, path: Path) -> np.ndarray | None:
    if name not in group:
        return None
    arr = group[name]
    if arr.shape != (n,):
        raise NilError(f"{path}: {name} must have shape ({n},) to match images, got {arr.shape}")
    return np.asarray(arr[:])


def read_zarr(
    path: str | Path, *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> Dataset:
    """A zarr patch store as a Dataset with a seeded stratified split (images streamed).

    Classes come from the group attribute ``classes`` when present, else ``"0".."C-1"``.
    """
    path = Path(path)
    group = open_group(path)
    for name in ("images", "labels"):
        if name not in group:
            raise NilError(f"{path}: zarr store lacks the array {name!r}")
    images = group["images"]
    if images.dtype != np.uint8:
        raise NilError(f"{path}: images must be uint8, got {images.dtype}")
    if len(images.shape) != 4 or images.shape[3] not in (1, 3):
        raise NilError(f"{path}: images must have shape (N, H, W, C) with C 1 or 3, "
                       f"got {images.shape}")
    n, h, w, c = images.shape
    labels = _read_1d(group, "labels", n, path)
    if not np.issubdtype(labels.dtype, np.integer):
        raise NilError(f"{path}: labels must be integers, got {labels.dtype}")
    ids = _read_1d(group, "ids", n, path)
    if ids is None:
        ids = np.arange(n, dtype=np.int64)
    elif not np.issubdtype(ids.dtype, np.integer):
        raise NilError(f"{path}: ids must be integers, got {ids.dtype}")
    keys = _read_1d(group, "keys", n, path)
    keys = IndexKeys(n) if keys is None else [str(k) for k in keys.tolist()]
    classes = group.attrs.get("classes")
    if classes is None:
        classes = [str(k) for k in range(int(labels.max(initial=-1)) + 1)]
    pool = ZarrSampleSet(path, labels, ids, keys)
    LOG.info("%s: zarr store of %d images %s, chunks of %d, %d classes",
             path, n, (h, w, c), pool.chunk_size(), len(classes))
    return seeded_dataset(
        pool, [str(x) for x in classes], format="zarr", source=str(path), channels=c,
        image_size=h if h == w else None, seed=seed, val_fraction=val_fraction,
        test_fraction=test_fraction, info={"generator": dict(group.attrs.get("generator", {}))},
    )
