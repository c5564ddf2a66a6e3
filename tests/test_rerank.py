"""Exact re-ranking of candidate rows: faiss' in-place distance kernel against the torch path and a loop."""
import math

import pytest
import torch

from faiss_index.streaming.rerank import candidate_distances, rerank

faiss = pytest.importorskip("faiss")


def _case(seed=0, nq=12, n=300, d=16, classes=3, k_cand=20):
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n, d, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    ids = torch.arange(1000, 1000 + n)
    rows = torch.randint(0, n, (nq,), generator=g)
    xq, yq, qid = vectors[rows] + 0.1 * torch.randn(nq, d, generator=g), labels[rows], ids[rows]
    cand = torch.randint(0, n, (nq, k_cand), generator=g)
    cand[:, 0] = rows  # the query's own id: must be dropped
    cand[:, 1] = cand[:, 2]  # a duplicate: must not be returned twice
    cand[:, 3] = -1  # no candidate
    return xq, yq, qid, cand, vectors, labels, ids


def test_faiss_kernel_matches_torch_distances():
    xq, _, _, cand, vectors, _, _ = _case()
    r = cand.clamp_min(0)
    expect = torch.linalg.vector_norm(vectors[r] - xq.unsqueeze(1), dim=2)
    torch.testing.assert_close(candidate_distances(xq, vectors, r, faiss), expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(candidate_distances(xq, vectors, r), expect, rtol=1e-5, atol=1e-5)
    # a float16 store or non-contiguous queries take the torch path and agree
    half = candidate_distances(xq.T.contiguous().T, vectors.half(), r, faiss)
    torch.testing.assert_close(half, expect, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("same_class", [False, True])
def test_rerank_with_faiss_kernel_equals_loop(k, same_class):
    xq, yq, qid, cand, vectors, labels, ids = _case(seed=k)
    d_f, r_f = rerank(xq, yq, qid, cand, vectors, labels, ids, k, same_class, faiss=faiss)
    d_t, r_t = rerank(xq, yq, qid, cand, vectors, labels, ids, k, same_class)
    assert torch.equal(r_f, r_t)
    torch.testing.assert_close(d_f, d_t, rtol=1e-5, atol=1e-5)
    for q in range(xq.shape[0]):  # reference: distinct valid candidates by distance
        keep = sorted({int(c) for c in cand[q] if c >= 0 and (labels[c] == yq[q]) == same_class
                       and ids[c] != qid[q]}, key=lambda c: math.dist(xq[q].tolist(), vectors[c].tolist()))
        want = keep[:k] + [-1] * (k - len(keep[:k]))
        assert r_f[q].tolist() == want
        assert qid[q] not in ids[r_f[q][r_f[q] >= 0]]


def test_rerank_without_candidates():
    xq, yq, qid, cand, vectors, labels, ids = _case()
    d, r = rerank(xq, yq, qid, cand[:, :0], vectors, labels, ids, 2, False, faiss=faiss)
    assert r.eq(-1).all() and torch.isinf(d).all()
