"""Snapshot: a background build reads the store as it was when it started, without a copy."""
import torch

from faiss_index.streaming.snapshot import Snapshot


def test_rows_written_after_the_snapshot_read_back_with_their_old_values():
    store = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    before = store.clone()
    snap = Snapshot(store)
    for rows in (torch.tensor([2, 5]), torch.tensor([5, 7, 7])):  # 5 twice: its first old value counts
        snap.save(rows)
        store[rows] = -store[rows] - 100
    assert len(snap) == 3
    assert torch.equal(snap.read(), before)
    assert torch.equal(snap.read(torch.tensor([7, 0, 5])), before[[7, 0, 5]])
    rows, old = snap.saved()
    assert rows.tolist() == [2, 5, 7] and torch.equal(old, before[[2, 5, 7]])


def test_rows_beyond_the_snapshot_and_unknown_ids_are_ignored():
    store = torch.zeros(4, 2, dtype=torch.float16)
    snap = Snapshot(store)
    snap.save(torch.tensor([-1, 4, 9]))
    assert len(snap) == 0 and snap.saved()[0].numel() == 0
    snap.save(torch.arange(4).repeat(600))  # grows its buffer past the first capacity: no error
    assert len(snap) == 4 and snap.read().dtype == torch.float32  # a float16 store reads back as float32
