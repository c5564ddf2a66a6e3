"""GPU paths (marked gpu; skipped without CUDA, and the faiss ones without a GPU faiss)."""
import pytest
import torch

from faiss_index import ExactIndex, load_index, make_index, save_index
from faiss_index.synthetic import clustered

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

N, DIM, CLASSES = 5000, 32, 4


@pytest.fixture(scope="module")
def data():
    x, y = clustered(N, DIM, CLASSES, clusters_per_class=12, spread=0.5, seed=7)
    ids = torch.arange(N) + 11
    q = torch.arange(0, N, 25)
    return x, y, ids, q


def faiss_gpu():
    faiss = pytest.importorskip("faiss")
    from faiss_index.engines.faiss_lib import gpu_count

    if gpu_count(faiss) == 0:
        pytest.skip("faiss has no GPU support here")
    return faiss


def test_exact_index_on_cuda_matches_cpu(data):
    x, y, ids, q = data
    cpu, gpu = ExactIndex(DIM, CLASSES), ExactIndex(DIM, CLASSES, device="cuda")
    for ix in (cpu, gpu):
        ix.upsert(ids, x, y)
    for same in (False, True):
        a = cpu._search(x[q], y[q], 3, ids[q], True, same)
        b = gpu._search(x[q].cuda(), y[q].cuda(), 3, ids[q].cuda(), True, same)
        assert b.ids.is_cuda and b.vectors.is_cuda
        assert torch.equal(a.ids, b.ids.cpu())
        torch.testing.assert_close(a.distances, b.distances.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["sharded", "global"])
def test_flat_on_cuda_equals_exact(data, strategy):
    faiss_gpu()
    x, y, ids, q = data
    exact = ExactIndex(DIM, CLASSES, device="cuda")
    flat = make_index("flat", DIM, CLASSES, device="cuda", strategy=strategy)
    for ix in (exact, flat):
        ix.upsert(ids.cuda(), x.cuda(), y.cuda())
    flat.build()
    for same in (False, True):
        a = exact._search(x[q].cuda(), y[q].cuda(), 3, ids[q].cuda(), True, same)
        b = flat._search(x[q].cuda(), y[q].cuda(), 3, ids[q].cuda(), True, same)
        assert b.ids.is_cuda and torch.equal(a.ids, b.ids)
        torch.testing.assert_close(a.distances, b.distances, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, minimum", [("ivf", 0.9), ("ivfpq", 0.8), ("cagra", 0.8)])
def test_approximate_kinds_on_cuda(data, kind, minimum):
    faiss = faiss_gpu()
    if kind == "cagra" and not hasattr(faiss, "GpuIndexCagra"):
        pytest.skip("faiss built without cuVS")
    x, y, ids, q = data
    exact = ExactIndex(DIM, CLASSES, device="cuda")
    exact.upsert(ids, x, y)
    index = make_index(kind, DIM, CLASSES, device="cuda", refresh_every=0)
    index.upsert(ids, x, y)
    index.build()
    truth = exact.search_other_class(x[q], y[q], 1, query_ids=ids[q])
    res = index.search_other_class(x[q].cuda(), y[q].cuda(), 1, query_ids=ids[q].cuda(), return_vectors=True)
    assert res.ids.device.type == "cuda"
    assert (res.ids[:, 0] == truth.ids[:, 0]).float().mean().item() >= minimum
    assert (res.labels[:, 0] != y[q].cuda()).all()
    # Streaming on the GPU: a moved vector is searched exactly in the delta.
    index.upsert(ids[:1], x[:1] + 50, y[:1])
    r = index.search_other_class(x[:1] + 50, (y[:1] + 1) % CLASSES, 1)
    assert r.ids[0, 0].item() == ids[0].item() and r.distances[0, 0].item() < 1e-4


def test_save_on_gpu_load_on_cpu_and_gpu(data, tmp_path):
    faiss_gpu()
    x, y, ids, q = data
    index = make_index("ivf", DIM, CLASSES, device="cuda", refresh_every=0)
    index.upsert(ids, x, y)
    index.build()
    out = save_index(index, tmp_path / "idx", classes=[str(c) for c in range(CLASSES)])
    again, _ = load_index(out, device="cuda")
    a = index.search_other_class(x[q], y[q], 2, query_ids=ids[q])
    b = again.search_other_class(x[q], y[q], 2, query_ids=ids[q])
    assert torch.equal(a.ids, b.ids)
    cpu, _ = load_index(out, device="cpu")  # GPU shards are rebuilt as the CPU structure
    c = cpu.search_other_class(x[q], y[q], 1, query_ids=ids[q])
    assert (c.labels[:, 0] != y[q]).all() and c.ids.device.type == "cpu"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_shards_spread_over_gpus(data):
    faiss_gpu()
    x, y, ids, q = data
    index = make_index("flat", DIM, CLASSES, device="cuda")
    index.upsert(ids, x, y)
    index.build()
    assert len({gpu for _, _, gpu, _ in index.engine.shards.values()}) >= 2
    exact = ExactIndex(DIM, CLASSES)
    exact.upsert(ids, x, y)
    a = exact.search_other_class(x[q], y[q], 1, query_ids=ids[q])
    b = index.search_other_class(x[q].cuda(), y[q].cuda(), 1, query_ids=ids[q].cuda())
    assert torch.equal(a.ids, b.ids.cpu())
