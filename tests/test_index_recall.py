"""Every CPU kind against the exact engine on seeded clustered data (classes interleaved).

flat must equal exact; approximate kinds must reach a stated recall@1 at this small size.
"""
import pytest
import torch

from faiss_index import ExactIndex, make_index
from faiss_index.synthetic import clustered

pytest.importorskip("faiss")

N, DIM, CLASSES = 6000, 32, 4


@pytest.fixture(scope="module")
def data():
    x, y = clustered(N, DIM, CLASSES, clusters_per_class=15, spread=0.5, seed=3)
    ids = torch.arange(N) * 7 + 1
    exact = ExactIndex(DIM, CLASSES)
    exact.upsert(ids, x, y)
    q = torch.randperm(N, generator=torch.Generator().manual_seed(4))[:300]
    truth = {same: exact._search(x[q], y[q], 3, ids[q], True, same) for same in (False, True)}
    return x, y, ids, q, truth


_BUILT = {}


def built(kind, x, y, ids, **params):
    """Build once per configuration for the whole module (builds dominate this file's time)."""
    key = (kind, tuple(sorted(params.items())), len(x))
    if key not in _BUILT:
        index = make_index(kind, DIM, CLASSES, **params)
        index.upsert(ids, x, y)
        index.build()
        _BUILT[key] = index
    return _BUILT[key]


def recall(res, truth):
    # The exact nearest id, or a different id at the same distance (a tie).
    hit = (res.ids[:, 0] == truth.ids[:, 0]) | (res.distances[:, 0] <= truth.distances[:, 0] * (1 + 1e-6))
    return hit.float().mean().item()


@pytest.mark.parametrize("strategy", ["sharded", "global"])
def test_flat_equals_exact(data, strategy):
    x, y, ids, q, truth = data
    index = built("flat", x, y, ids, strategy=strategy)
    for same in (False, True):
        res = index._search(x[q], y[q], 3, ids[q], True, same)
        assert torch.equal(res.ids, truth[same].ids)
        assert torch.equal(res.labels, truth[same].labels)
        torch.testing.assert_close(res.distances, truth[same].distances)
        torch.testing.assert_close(res.vectors, truth[same].vectors)


# (kind, params, minimum recall@1 other-class) at N=6000, 4 classes, default parameters.
CASES = [
    ("ivf", {}, 0.95),
    ("ivfpq", {}, 0.95),
    ("ivfpq", {"nprobe": 64, "rerank": 64}, 0.99),
    ("hnsw", {}, 0.95),
    ("ivf", {"strategy": "global", "nprobe": 64}, 0.95),
    ("ivfpq", {"strategy": "global", "nprobe": 64}, 0.95),
]


@pytest.mark.parametrize("kind, params, minimum", CASES)
def test_approximate_recall(data, kind, params, minimum):
    x, y, ids, q, truth = data
    index = built(kind, x, y, ids, **params)
    res = index.search_other_class(x[q], y[q], 3, query_ids=ids[q])
    r = recall(res, truth[False])
    assert r >= minimum, f"{kind} {params}: recall@1 {r:.3f} < {minimum}"
    # Whatever is returned is of another class, never the query itself, with exact distances.
    assert (res.labels != y[q].unsqueeze(1)).all()
    assert not (res.ids == ids[q].unsqueeze(1)).any()
    v, _ = index.get(res.ids[:, 0])
    torch.testing.assert_close(res.distances[:, 0], (v - x[q]).norm(dim=1))
    # Same-class neighbours (triplet positives) are near-trivially found.
    pos = index.search_same_class(x[q], y[q], 1, query_ids=ids[q])
    assert recall(pos, truth[True]) >= 0.95
    assert (pos.labels[:, 0] == y[q]).all()


def test_params_are_resolved(data):
    x, y, ids, _, _ = data
    index = built("ivfpq", x, y, ids)
    p = index.params
    assert p["strategy"] == "sharded" and p["probe"] == "joint"
    assert p["nlist"] >= 1 and p["nprobe"] >= 1 and p["m"] == DIM and p["nbits"] == 4
    assert p["nlist_per_class"] == [p["nlist"]] * CLASSES or all(n > 0 for n in p["nlist_per_class"])
    assert built("ivf", x, y, ids, nlist=8, nprobe=3).params["nprobe"] == 3


def test_many_classes_use_the_global_filter():
    x, y = clustered(4000, 16, 40, clusters_per_class=2, spread=0.5, seed=5)
    ids = torch.arange(4000)
    exact = ExactIndex(16, 40)
    exact.upsert(ids, x, y)
    q = torch.arange(0, 4000, 40)
    truth = exact.search_other_class(x[q], y[q], 1, query_ids=ids[q])
    for kind, minimum in (("flat", 1.0), ("ivf", 0.9), ("hnsw", 0.9)):
        index = make_index(kind, 16, 40)
        assert index.strategy == "global"
        index.upsert(ids, x, y)
        index.build()
        res = index.search_other_class(x[q], y[q], 1, query_ids=ids[q])
        assert recall(res, truth) >= minimum, kind
        assert (res.labels[:, 0] != y[q]).all()


@pytest.mark.parametrize("kind", ["exact", "ivfpq", "flat"])
def test_a_float16_store_halves_the_vectors_and_keeps_recall(data, kind):
    """Against the float32 truth: only the stored values are rounded (2^-11 relative), so the
    nearest other-class sample is the same one except at near-ties."""
    x, y, ids, q, truth = data
    index = built(kind, x, y, ids, store_dtype="float16")
    full = built(kind, x, y, ids)
    assert index.store.vectors.dtype == torch.float16
    assert index.store.vectors.element_size() * 2 == full.store.vectors.element_size()
    res = index.search_other_class(x[q], y[q], 3, query_ids=ids[q], return_vectors=True)
    assert res.vectors.dtype == torch.float32 and res.distances.dtype == torch.float32
    hit = (res.ids[:, 0] == truth[False].ids[:, 0]) | (res.distances[:, 0] <= truth[False].distances[:, 0] * (1 + 1e-3))
    assert hit.float().mean().item() >= (0.99 if kind != "ivfpq" else 0.95)
    assert (res.labels != y[q].unsqueeze(1)).all()
    torch.testing.assert_close(res.vectors[:, 0], x.half().float()[res.ids[:, 0].div(7, rounding_mode="floor")])
    v, _ = index.get(ids[q])
    assert v.dtype == torch.float32 and (v - x[q]).abs().max().item() < 1e-3
