"""The chunk-local shuffling sampler and the image transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nil.data import ChunkShuffleSampler, make_transform
from nil.data.base import SampleSet


class Chunked(SampleSet):
    """Labels only; ``chunk`` samples per stored chunk (None: not chunked)."""

    def __init__(self, n: int, chunk: int | None):
        super().__init__(np.zeros(n), np.arange(n), [str(i) for i in range(n)])
        self.chunk = chunk

    def chunk_size(self):
        return self.chunk


def assert_chunk_local(order: np.ndarray, chunk_of: np.ndarray, window: int) -> None:
    """``order`` is a permutation read in windows of ``window`` chunks, each window contiguous."""
    n = len(chunk_of)
    assert sorted(order.tolist()) == list(range(n))
    seq = chunk_of[order]
    _, first = np.unique(seq, return_index=True)
    by_appearance = seq[np.sort(first)]
    start = 0
    for k in range(0, len(by_appearance), window):
        chunks = by_appearance[k:k + window]
        size = int(np.isin(chunk_of, chunks).sum())
        assert np.isin(seq[start:start + size], chunks).all(), f"window {k // window} not contiguous"
        start += size
    assert start == n


@pytest.mark.parametrize("n, chunk, window", [(1000, 64, 4), (1000, 64, 1), (37, 10, 3)])
def test_permutation_and_chunk_locality(n, chunk, window):
    sampler = ChunkShuffleSampler(Chunked(n, chunk), seed=0, window_chunks=window)
    order = np.array(list(sampler))
    assert len(sampler) == n
    assert_chunk_local(order, np.arange(n) // chunk, window)
    assert not np.array_equal(order, np.arange(n))
    if n // chunk >= 10:  # the chunk order itself is shuffled, not only items inside chunks
        seq = (np.arange(n) // chunk)[order]
        _, first = np.unique(seq, return_index=True)
        assert not np.array_equal(seq[np.sort(first)], np.unique(seq))


def test_shuffles_within_windows_not_just_chunk_order():
    sampler = ChunkShuffleSampler(Chunked(400, 100), seed=1, window_chunks=4)
    order = np.array(list(sampler))
    # one window holds all four chunks: consecutive items come from different chunks
    assert len(set((order[:8] // 100).tolist())) > 1


def test_deterministic_per_seed_and_epoch():
    samples = Chunked(500, 32)
    a, b = ChunkShuffleSampler(samples, seed=3), ChunkShuffleSampler(samples, seed=3)
    first = list(a)
    assert first == list(b)
    assert list(a) != first  # the next pass is the next epoch
    a.set_epoch(0)
    assert list(a) == first
    a.set_epoch(5), b.set_epoch(5)
    assert list(a) == list(b)
    assert list(ChunkShuffleSampler(samples, seed=4)) != first


def test_subset_groups_by_parent_chunk():
    parent = Chunked(1000, 100)
    index = np.sort(np.random.default_rng(0).choice(1000, 300, replace=False))
    subset = parent.subset(index)
    for window in (1, 2):
        order = np.array(list(ChunkShuffleSampler(subset, seed=0, window_chunks=window)))
        assert_chunk_local(order, index // 100, window)


def test_nested_subset_uses_the_innermost_parent():
    parent = Chunked(1000, 100)
    outer = parent.subset(np.arange(500, 1000))
    inner = outer.subset(np.arange(0, 500, 2))  # parent positions 500, 502, ...
    order = np.array(list(ChunkShuffleSampler(inner, seed=2, window_chunks=1)))
    assert_chunk_local(order, (500 + 2 * np.arange(250)) // 100, 1)


def test_unchunked_samples_use_1024():
    sampler = ChunkShuffleSampler(Chunked(3000, None), seed=0, window_chunks=1)
    order = np.array(list(sampler))
    chunks = order // 1024
    assert (np.diff(chunks) != 0).sum() == 2  # three chunks, each read in one run


def test_transform_shapes_range_and_values():
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[:, :5] = 255
    x = make_transform(False, 10, 3)(rgb)
    assert x.shape == (3, 10, 10) and x.dtype == torch.float32
    assert torch.all(x[:, :, :5] == 1.0) and torch.all(x[:, :, 5:] == -1.0)
    y = make_transform(False, 20, 3)(rgb)  # resized with antialiasing
    assert y.shape == (3, 20, 20) and y.min() >= -1 and y.max() <= 1
    gray = np.full((28, 28, 1), 51, np.uint8)
    g = make_transform(False, 28, 1)(gray)
    assert g.shape == (1, 28, 28) and torch.allclose(g, torch.full_like(g, 51 / 255 * 2 - 1))
    assert make_transform(False, 28, 3)(gray).shape == (3, 28, 28)
    assert make_transform(False, 10, 1)(rgb).shape == (1, 10, 10)


def test_train_transform_flips():
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    plain = make_transform(False, 4, 3)(image)
    t = make_transform(True, 4, 3)
    torch.manual_seed(0)
    outs = [t(image) for _ in range(40)]
    variants = {
        "none": plain, "h": plain.flip(-1), "v": plain.flip(-2), "hv": plain.flip(-1).flip(-2),
    }
    seen = {name for o in outs for name, v in variants.items() if torch.equal(o, v)}
    assert seen == set(variants)
    assert all(any(torch.equal(o, v) for v in variants.values()) for o in outs)
