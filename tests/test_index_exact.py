"""knn_other_class, the exact engine, against a brute-force Python loop."""
import math

import numpy as np
import pytest
import torch

from faiss_index import IndexInputError, knn_other_class


def brute(xq, yq, xb, yb, k, qid=None, bid=None, same_class=False):
    """Python-loop reference: (Q, k) distances (inf pad) and rows (-1 pad), ties by row order."""
    D = np.full((len(xq), k), np.inf, dtype=np.float64)
    I = np.full((len(xq), k), -1, dtype=np.int64)
    for q in range(len(xq)):
        cands = []
        for r in range(len(xb)):
            if (yb[r] == yq[q]) != same_class:
                continue
            if qid is not None and bid[r] == qid[q]:
                continue
            cands.append((math.dist(xq[q].tolist(), xb[r].tolist()), r))
        cands.sort()
        for j, (d, r) in enumerate(cands[:k]):
            D[q, j], I[q, j] = d, r
    return D, I


def data(nq, nb, d, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    xq = torch.randn(nq, d, generator=g)
    xb = torch.randn(nb, d, generator=g)
    yq = torch.randint(0, classes, (nq,), generator=g)
    yb = torch.randint(0, classes, (nb,), generator=g)
    return xq, yq, xb, yb


def check(D, I, Dr, Ir):
    assert D.dtype == torch.float32 and I.dtype == torch.int64
    np.testing.assert_array_equal(I.numpy(), Ir)
    np.testing.assert_allclose(D.numpy(), Dr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("same_class", [False, True])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_matches_brute_force(k, same_class):
    xq, yq, xb, yb = data(23, 301, 8, 4)
    D, I = knn_other_class(xq, yq, xb, yb, k, same_class=same_class)
    check(D, I, *brute(xq, yq, xb, yb, k, same_class=same_class))


@pytest.mark.parametrize("chunk", [1, 7, 64, 300, 301, 1000])
def test_chunk_boundaries_do_not_change_results(chunk):
    xq, yq, xb, yb = data(17, 301, 6, 3, seed=1)
    D, I = knn_other_class(xq, yq, xb, yb, 4, chunk=chunk)
    check(D, I, *brute(xq, yq, xb, yb, 4))


def test_own_id_is_never_returned():
    xq, yq, xb, yb = data(20, 200, 5, 3, seed=2)
    bid = torch.arange(200) * 10 + 3
    pick = torch.arange(0, 200, 10)
    xq, yq, qid = xb[pick], yb[pick], bid[pick]  # queries are stored rows
    for same in (False, True):
        D, I = knn_other_class(xq, yq, xb, yb, 3, qid=qid, bid=bid, same_class=same)
        assert not (I == pick.unsqueeze(1)).any()
        check(D, I, *brute(xq, yq, xb, yb, 3, qid=qid.numpy(), bid=bid.numpy(), same_class=same))
    # Without ids, same-class search finds the query itself at distance 0.
    D, I = knn_other_class(xq, yq, xb, yb, 1, same_class=True)
    assert torch.equal(I[:, 0], pick) and torch.all(D[:, 0] == 0)


def test_own_id_excluded_even_with_another_label():
    # The stored row of the query's id carries another label (e.g. before an upsert lands).
    xb = torch.tensor([[0.0, 0.0], [5.0, 0.0]])
    yb = torch.tensor([1, 1])
    D, I = knn_other_class(torch.zeros(1, 2), torch.tensor([0]), xb, yb, 2, qid=torch.tensor([7]),
                           bid=torch.tensor([7, 8]))
    assert I.tolist() == [[1, -1]] and D[0, 0] == 5.0 and math.isinf(D[0, 1])


def test_minus_one_when_other_classes_are_empty():
    xb = torch.randn(10, 4)
    yb = torch.full((10,), 2)
    xq = torch.randn(3, 4)
    D, I = knn_other_class(xq, torch.tensor([2, 2, 0]), xb, yb, 2)
    assert I[:2].eq(-1).all() and torch.isinf(D[:2]).all()
    assert (I[2] >= 0).all()
    # Fewer candidates than k: the tail is padded.
    D, I = knn_other_class(xq, torch.tensor([0, 1, 2]), xb[:3], torch.tensor([0, 0, 1]), 3)
    assert I[0].tolist()[1:] == [-1, -1] and torch.isinf(D[0, 1:]).all()


def test_empty_inputs():
    D, I = knn_other_class(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.randn(5, 4),
                           torch.zeros(5, dtype=torch.long), 2)
    assert D.shape == (0, 2) and I.shape == (0, 2)
    D, I = knn_other_class(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), torch.zeros(0, 4),
                           torch.zeros(0, dtype=torch.long), 2)
    assert I.eq(-1).all() and torch.isinf(D).all()


def test_wide_and_negative_labels_use_the_mask_path():
    xq, yq, xb, yb = data(15, 120, 4, 3, seed=3)
    for shift in (1000, -5):
        D, I = knn_other_class(xq, yq + shift, xb, yb + shift, 3)
        check(D, I, *brute(xq, yq, xb, yb, 3))


def test_distances_are_exact_for_near_duplicates():
    # The expanded |q|^2 - 2 q.b + |b|^2 form loses precision near 0; results are recomputed.
    xb = torch.tensor([[1000.0, 1000.0], [1000.0, 1000.001], [0.0, 0.0]])
    D, I = knn_other_class(torch.tensor([[1000.0, 1000.0]]), torch.tensor([0]), xb, torch.tensor([1, 1, 1]), 2)
    assert I.tolist() == [[0, 1]]
    assert D[0, 0] == 0.0 and abs(D[0, 1].item() - 0.001) < 1e-4


def test_accepts_numpy():
    xq, yq, xb, yb = data(5, 40, 3, 2, seed=4)
    D, I = knn_other_class(xq.numpy(), yq.numpy(), xb.numpy(), yb.numpy(), 2)
    check(D, I, *brute(xq, yq, xb, yb, 2))


@pytest.mark.parametrize("call, match", [
    (lambda: knn_other_class(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), torch.randn(4, 5),
                             torch.zeros(4, dtype=torch.long)), "dimension"),
    (lambda: knn_other_class(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), torch.randn(4, 3),
                             torch.zeros(4, dtype=torch.long), k=0), "k must be"),
    (lambda: knn_other_class(torch.randn(2, 3), torch.zeros(2), torch.randn(4, 3),
                             torch.zeros(4, dtype=torch.long)), "integer dtype"),
    (lambda: knn_other_class(torch.randn(2, 3), torch.zeros(3, dtype=torch.long), torch.randn(4, 3),
                             torch.zeros(4, dtype=torch.long)), "shape"),
    (lambda: knn_other_class(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), torch.randn(4, 3),
                             torch.zeros(4, dtype=torch.long), qid=torch.zeros(2, dtype=torch.long)), "together"),
])
def test_input_errors(call, match):
    with pytest.raises(IndexInputError, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    xq, yq, xb, yb = data(50, 3000, 16, 5, seed=5)
    qid, bid = torch.arange(50), torch.arange(3000)
    for same in (False, True):
        Dc, Ic = knn_other_class(xq, yq, xb, yb, 4, qid=qid, bid=bid, same_class=same, chunk=700)
        Dg, Ig = knn_other_class(xq.cuda(), yq.cuda(), xb.cuda(), yb.cuda(), 4, qid=qid.cuda(), bid=bid.cuda(),
                                 same_class=same, chunk=700)
        assert Dg.is_cuda and torch.equal(Ig.cpu(), Ic)
        torch.testing.assert_close(Dg.cpu(), Dc, rtol=1e-5, atol=1e-5)


def test_huge_vectors_do_not_overflow_the_class_penalty():
    xq, yq, xb, yb = data(6, 50, 3, 2, seed=6)
    D, I = knn_other_class(xq * 1e17, yq, xb * 1e17, yb, 2)
    Dr, Ir = brute(xq, yq, xb, yb, 2)
    np.testing.assert_array_equal(I.numpy(), Ir)
    np.testing.assert_allclose(D.numpy() / 1e17, Dr, rtol=1e-4)
