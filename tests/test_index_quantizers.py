"""The torch-side quantizers: k-means, PQ codebooks, and faiss-compatible code packing."""
import numpy as np
import pytest
import torch

from faiss_index.quantizers.kmeans import assign, kmeans, seeded_sample
from faiss_index.quantizers.pq import encode_pq, pack_codes, train_pq


def test_kmeans_is_seeded_and_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = (centres[torch.arange(600) % 3] + 0.1 * torch.randn(600, 2, generator=g))
    c1 = kmeans(x, 3, niter=10, seed=5)
    c2 = kmeans(x, 3, niter=10, seed=5)
    assert torch.equal(c1, c2)
    found = sorted(c1.round().tolist())
    assert found == sorted(centres.tolist())
    idx, dis = assign(x, c1)
    assert torch.equal(idx, assign(x, c1)[0]) and (dis < 0.2).all()
    # Warm start from the answer stays there.
    assert torch.allclose(kmeans(x, 3, niter=2, init=c1), c1, atol=1e-5)


def test_kmeans_reseeds_empty_clusters():
    x = torch.cat([torch.zeros(50, 2), torch.ones(50, 2)])
    init = torch.tensor([[0.0, 0.0], [1.0, 1.0], [50.0, 50.0]])  # the third attracts nothing
    c = kmeans(x, 3, niter=3, init=init)
    assert (c.abs() < 2).all()


def test_seeded_sample():
    a = seeded_sample(1000, 10, seed=3)
    assert torch.equal(a, seeded_sample(1000, 10, seed=3)) and a.unique().numel() == 10
    assert torch.equal(seeded_sample(5, 10, seed=3), torch.arange(5))


@pytest.mark.parametrize("m, nbits", [(24, 4), (6, 8), (8, 5), (3, 4), (12, 6), (24, 8)])
def test_codes_match_faiss_encoder(m, nbits):
    faiss = pytest.importorskip("faiss")
    x = torch.randn(2000, 24, generator=torch.Generator().manual_seed(1))
    c = train_pq(x, m, nbits, niter=5)
    assert c.shape == (m, 1 << nbits, 24 // m)
    pq = faiss.ProductQuantizer(24, m, nbits)
    faiss.copy_array_to_vector(c.numpy().ravel(), pq.centroids)
    np.testing.assert_array_equal(pack_codes(encode_pq(x, c), nbits), pq.compute_codes(x.numpy()))


def test_scalar_levels_are_sorted_and_fit_the_data():
    x = torch.rand(5000, 4) * torch.tensor([1.0, 2.0, 4.0, 8.0])
    levels = train_pq(x, 4, 4, niter=10)[:, :, 0]
    assert torch.equal(levels, levels.sort(dim=1).values)
    err = (levels.gather(1, encode_pq(x, levels.unsqueeze(2)).T.long()).T - x).abs()
    assert (err.max(dim=0).values <= torch.tensor([1.0, 2.0, 4.0, 8.0]) / 16 + 1e-3).all()
