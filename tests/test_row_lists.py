"""RowLists: every stored row keeps exactly one entry, whose code is its newest vector's, wherever
in-place updates rewrite it, move it between lists or drop it."""
import numpy as np
import pytest
import torch

from faiss_index import make_index

faiss = pytest.importorskip("faiss")

DIM = 8


def entry_codes(engine):
    """{row: (list, code bytes)} read back from the faiss lists, unpacking fast-scan blocks."""
    inv = faiss.downcast_InvertedLists(engine.index.invlists)
    packer = getattr(inv, "packer", None)
    cs = engine.index.code_size
    out = {}
    for lno in range(engine.index.nlist):
        n = inv.list_size(lno)
        if not n:
            continue
        ids = faiss.rev_swig_ptr(inv.get_ids(lno), n)
        for pos in range(n):
            if packer is None:
                code = faiss.rev_swig_ptr(inv.get_codes(lno), n * cs)[pos * cs:(pos + 1) * cs].copy()
            else:
                code = np.empty(cs, dtype=np.uint8)
                packer.unpack_1_c(inv.get_codes(lno), pos, faiss.swig_ptr(code))
            assert int(ids[pos]) not in out, "a row has two entries"
            out[int(ids[pos])] = (lno, code)
    return out


def want_code(engine, v):
    from faiss_index.quantizers.pq import encode_pq, pack_codes

    if engine.kind == "ivf":
        return np.ascontiguousarray(v.numpy()).view(np.uint8)
    return pack_codes(encode_pq(v.unsqueeze(0), engine.pq_centroids), 4)[0]


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_rewrites_moves_and_label_changes_leave_one_current_entry_per_row(kind):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2000, DIM, generator=g), torch.randint(0, 3, (2000,), generator=g)
    index = make_index(kind, DIM, 4, refresh_every=0)  # class 3 has no rows: no lists
    index.upsert(torch.arange(2000), x, y)
    index.build()
    for step in range(8):
        rows = torch.randperm(2000, generator=g)[:300]
        # small moves (rewritten in place), large ones (moved to another list), label changes
        scale = torch.where(torch.rand(300, 1, generator=g) < 0.5, 0.01, 1.0)
        v = x[rows] + scale * torch.randn(300, DIM, generator=g)
        lab = torch.where(torch.rand(300, generator=g) < 0.1, (y[rows] + 1) % 3, y[rows])
        index.upsert(rows, v, lab)
        x[rows], y[rows] = v, lab
    gone = torch.arange(5)
    index.upsert(gone, x[gone], torch.full((5,), 3))  # into class 3, which has no lists: leave the structure
    engine = index.engine
    entries = entry_codes(engine)
    assert sorted(entries) == list(range(5, 2000)) and engine.index.ntotal == 1995
    assert index.delta_rows().tolist() == gone.tolist()
    offsets = np.cumsum([0] + engine.nlist_per_class)
    for row, (lno, code) in entries.items():
        assert offsets[y[row]] <= lno < offsets[y[row] + 1]  # a list of the row's current class
        assert np.array_equal(code, want_code(engine, x[row]))  # holding its newest vector
    assert engine.list_size.tolist() == [faiss.downcast_InvertedLists(engine.index.invlists).list_size(i)
                                         for i in range(engine.index.nlist)]
