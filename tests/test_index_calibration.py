"""nprobe calibration of the CPU IVF engine (parameter ``probe_recall``).

Each build searches a seeded sample of stored rows exactly and raises nprobe until the lists probed
hold the nearest other-class row of ``probe_recall`` of them. On data where the default suffices it
stays; where the nearest other-class row sits in a far-ranked list it grows, and recall with it.
"""
import pytest
import torch

from faiss_index import load_index, make_index, save_index
from faiss_index.engines.exact import knn_other_class
from faiss_index.errors import IndexInputError
from faiss_index.synthetic import clustered

pytest.importorskip("faiss")


def scattered(n=12000, dim=24, classes=9, seed=0):
    """Labels independent of position: every list of another class is about as near as any other,
    so the true neighbour's list is ranked anywhere and the default nprobe finds few of them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)


def built(x, y, kind="ivf", **params):
    index = make_index(kind, x.shape[1], int(y.max()) + 1, refresh_every=0, nlist=32, **params)
    index.upsert(torch.arange(x.shape[0]), x, y)
    index.build()
    return index


def recall(index, x, y, rows):
    res = index.search_other_class(x[rows], y[rows], 1, query_ids=rows)
    d, i = knn_other_class(x[rows], y[rows], x, y, 1, qid=rows, bid=torch.arange(x.shape[0]))
    return float((res.distances[:, 0] <= d[:, 0] * (1 + 1e-5)).float().mean())


def test_calibration_raises_nprobe_where_the_default_misses_and_recall_follows():
    x, y = scattered()
    fixed = built(x, y, probe_recall=0)
    tuned = built(x, y)
    default = fixed.params["nprobe"]
    assert tuned.params["nprobe"] > 2 * default
    assert tuned.params["probe_recall_sampled"] >= 0.99
    rows = torch.arange(5, x.shape[0], 97)  # mostly rows outside the calibration sample
    r_fixed, r_tuned = recall(fixed, x, y, rows), recall(tuned, x, y, rows)
    assert r_fixed < 0.6 and r_tuned >= 0.95, (r_fixed, r_tuned)


def test_calibration_keeps_the_default_where_it_suffices():
    x, y = clustered(6000, 16, 6, clusters_per_class=5, spread=0.5, seed=1)
    fixed, tuned = built(x, y, probe_recall=0), built(x, y)
    assert tuned.params["nprobe"] == fixed.params["nprobe"]
    assert tuned.params["probe_recall_sampled"] >= 0.99


def test_a_given_nprobe_is_kept_and_a_lower_target_probes_fewer_lists():
    x, y = scattered(seed=2)
    assert built(x, y, nprobe=5).params["nprobe"] == 5
    assert "probe_recall_sampled" not in built(x, y, nprobe=5).params
    low, high = built(x, y, probe_recall=0.5), built(x, y, probe_recall=0.99)
    assert low.params["nprobe"] < high.params["nprobe"]


def test_calibrated_nprobe_and_depth_survive_save_and_load(tmp_path):
    x, y = scattered(seed=3)
    index = built(x, y, kind="ivfpq")
    nprobe, depth = index.params["nprobe"], index.params["rerank"]
    save_index(index, tmp_path / "ix", classes=[str(c) for c in range(9)])
    again, _ = load_index(tmp_path / "ix")
    assert again.params["nprobe"] == nprobe and again.params["rerank"] == depth
    rows = torch.arange(0, x.shape[0], 101)
    a = index.search_other_class(x[rows], y[rows], 1, query_ids=rows)
    b = again.search_other_class(x[rows], y[rows], 1, query_ids=rows)
    assert torch.equal(a.ids, b.ids)


@pytest.mark.parametrize("bad", [-0.1, 1.5, True, "high"])
def test_probe_recall_out_of_range_is_refused(bad):
    with pytest.raises(IndexInputError, match="probe_recall"):
        make_index("ivf", 8, 3, probe_recall=bad)


def test_rerank_depth_is_calibrated_to_the_data_and_a_given_depth_is_kept():
    """ivfpq ranks candidates by 4-bit codes: each build re-ranks exactly the fewest candidates (a
    multiple of 16 in [32, 256]) that hold the true row of probe_recall of the sampled rows."""
    x, y = clustered(20000, 32, 6, clusters_per_class=20, spread=0.6, seed=4)
    easy = built(x, y, kind="ivfpq")
    depth = easy.params["rerank"]
    assert 32 <= depth <= 256 and depth % 16 == 0
    assert easy.params["rerank_recall_sampled"] >= 0.99
    rows = torch.arange(3, x.shape[0], 53)
    assert recall(easy, x, y, rows) >= 0.97
    assert built(x, y, kind="ivfpq", probe_recall=0.5).params["rerank"] <= depth  # a lower target, fewer
    assert built(x, y, kind="ivfpq", rerank=40).params["rerank"] == 40  # given: kept
    assert built(x, y, kind="ivfpq", probe_recall=0).params["rerank"] == 192  # no calibration: the fixed default
    assert "rerank_recall_sampled" not in built(x, y, kind="ivf").params  # exact codes: nothing to calibrate
    # coarser codes (4 dimensions per 4-bit sub-quantizer) rank the true row lower: more candidates
    coarse = built(x, y, kind="ivfpq", m=8)
    assert coarse.params["rerank"] > depth
    assert recall(coarse, x, y, rows) >= 0.95 * coarse.params["rerank_recall_sampled"]
    capped = built(x, y, kind="ivfpq", m=2)  # codes too coarse for any depth: the cap, and the share says so
    assert capped.params["rerank"] == 256 and capped.params["rerank_recall_sampled"] < 0.9
