"""VectorStore: one row per sample id, in-place overwrite, last duplicate wins, growth."""
import numpy as np
import pytest
import torch

from faiss_index import IndexInputError, VectorStore
from faiss_index.streaming import store as store_mod


def test_insert_then_overwrite_in_place():
    s = VectorStore(3)
    rows = s.upsert(torch.tensor([10, 20, 30]), torch.arange(9.0).reshape(3, 3), torch.tensor([0, 1, 2]))
    assert rows.tolist() == [0, 1, 2] and len(s) == 3
    rows = s.upsert(torch.tensor([20, 40]), torch.full((2, 3), 7.0), torch.tensor([5, 6]))
    assert rows.tolist() == [1, 3] and len(s) == 4
    v, lab = s.get(torch.tensor([20, 10, 40, 99]))
    assert v[0].tolist() == [7.0, 7.0, 7.0] and v[1].tolist() == [0.0, 1.0, 2.0]
    assert lab.tolist() == [5, 0, 6, -1] and v[3].eq(0).all()
    assert s.rows_of(torch.tensor([30, 99, 40])).tolist() == [2, -1, 3]
    vec, labels, ids = s.view()
    assert ids.tolist() == [10, 20, 30, 40] and labels.tolist() == [0, 5, 2, 6]


def test_duplicates_within_one_call_last_wins():
    s = VectorStore(2)
    rows = s.upsert(np.array([5, 6, 5, 5]), np.array([[1, 1], [2, 2], [3, 3], [4, 4]], np.float32),
                    np.array([0, 1, 2, 3]))
    assert len(s) == 2 and rows.tolist() == [0, 1]
    v, lab = s.get([5, 6])
    assert v.tolist() == [[4.0, 4.0], [2.0, 2.0]] and lab.tolist() == [3, 1]


def test_growth_keeps_rows():
    s = VectorStore(4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 4, generator=g)
    for start in range(0, 5000, 700):
        s.upsert(torch.arange(start, min(5000, start + 700)) * 3, x[start:start + 700], torch.zeros(min(700, 5000 - start), dtype=torch.long))
    assert len(s) == 5000 and s.capacity >= 5000
    v, _ = s.get(torch.arange(5000) * 3)
    assert torch.equal(v, x)


def test_sparse_ids_switch_to_sorted_keys_and_keep_every_row():
    s = VectorStore(2)
    s.upsert([1, 2], torch.ones(2, 2), [0, 0])
    s.upsert([10**12, 2], torch.zeros(2, 2), [1, 1])
    assert s._map.table is None
    assert s.rows_of([1, 2, 10**12, 5, 10**12 + 1]).tolist() == [0, 1, 2, -1, -1]
    assert s.get([2])[1].tolist() == [1]


def test_one_large_id_does_not_allocate_a_table_up_to_it():
    s = VectorStore(4)
    s.upsert([2**25 + 1], torch.ones(1, 4), [0])
    assert s.nbytes() < 2**20  # a dense table up to that id would be 256-512 MiB
    assert s.rows_of([2**25 + 1, 2**25]).tolist() == [0, -1]


@pytest.mark.parametrize("make_ids", [
    pytest.param(lambda g, n: torch.randint(0, 2**62, (n,), generator=g), id="hashed-62-bit"),
    pytest.param(lambda g, n: 2**40 + torch.randint(0, 10**6, (n,), generator=g), id="near-2^40"),
    pytest.param(lambda g, n: torch.randperm(3 * n, generator=g)[:n] * 7, id="dense-enough"),
])
def test_ids_of_any_size_map_to_their_rows_in_memory_proportional_to_the_count(make_ids, monkeypatch):
    monkeypatch.setattr(store_mod, "_MERGE_MIN", 64)  # merge the side list often, as a long run does
    g = torch.Generator().manual_seed(0)
    n = 6000
    ids = torch.unique(make_ids(g, n))
    ids = ids[torch.randperm(ids.numel(), generator=g)]
    x = torch.randn(ids.numel(), 3, generator=g)
    s = VectorStore(3)
    for start in range(0, ids.numel(), 256):  # batches as training sends them, with repeats
        sl = slice(start, start + 256)
        s.upsert(ids[sl], x[sl], torch.zeros(x[sl].shape[0], dtype=torch.long))
        s.upsert(ids[:start + 1][-3:], x[:start + 1][-3:], torch.zeros(min(3, start + 1), dtype=torch.long))
    assert len(s) == ids.numel()
    v, _ = s.get(ids)
    assert torch.equal(v, x)
    assert torch.equal(s.rows_of(ids), torch.arange(ids.numel()))
    absent = torch.tensor([int(ids.max()) + 1, 0 if 0 not in ids.tolist() else int(ids.max()) + 2])
    assert s.rows_of(absent).tolist() == [-1, -1]
    id_map_bytes = s._map.nbytes()
    assert id_map_bytes <= 8 * (2 * store_mod.DENSE_SLACK * len(s) + store_mod.DENSE_FLOOR)


@pytest.mark.parametrize("ids, vectors, labels, match", [
    ([1, 2], torch.ones(2, 4), [0, 0], "dimension 4"),
    ([1.0, 2.0], torch.ones(2, 3), [0, 0], "integer dtype"),
    ([1, -2], torch.ones(2, 3), [0, 0], "non-negative"),
    ([1, 2], torch.tensor([[1.0, float("nan"), 0], [0, 0, 0]]), [0, 0], "NaN"),
    ([1, 2], torch.ones(2, 3), [0], "mismatched lengths"),
    ([1, 2], torch.ones(2, 3, dtype=torch.int64), [0, 0], "floating point"),
])
def test_validation(ids, vectors, labels, match):
    s = VectorStore(3)
    with pytest.raises(IndexInputError, match=match):
        s.upsert(ids, vectors, labels)
    assert len(s) == 0
