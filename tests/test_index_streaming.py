"""Streaming semantics of FaissIndex: in-place updates, delta, stale entries, refresh, and a property test.

The CPU IVF engine writes upserted rows into its lists at once (in place); every other engine
(and ivf/ivfpq with inplace=False) keeps them in an exact delta and skips their stale structure
entries until the next rebuild. Either way results are computed from fresh vectors.
"""
import math
import os
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faiss_index import FaissIndex, make_index
from faiss_index.errors import IndexInputError
from faiss_index.synthetic import clustered

pytest.importorskip("faiss")

DIM = 8


def base_data(n=600, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "hnsw"])
def test_replaced_vector_is_never_returned_with_its_old_distance(kind):
    x, y = base_data()
    ids = torch.arange(600)
    index = make_index(kind, DIM, 3, refresh_every=0)
    index.upsert(ids, x, y)
    index.build()
    q = x[:1] + 0.0
    yq = torch.tensor([(int(y[0]) + 1) % 3])  # a query of another class than sample 0
    # Make sample 0 the nearest by far, then move it far away without refreshing.
    index.upsert(torch.tensor([0]), q, y[:1])
    r = index.search_other_class(q, yq, 1)
    assert r.ids[0, 0] == 0 and r.distances[0, 0] == 0
    index.upsert(torch.tensor([0]), q + 100.0, y[:1])
    r = index.search_other_class(q, yq, 3, return_vectors=True)
    assert 0 not in r.ids[0].tolist() or r.distances[0, r.ids[0].tolist().index(0)] > 99
    v, _ = index.get(r.ids[0])
    torch.testing.assert_close(r.distances[0], (v - q).norm(dim=1))
    torch.testing.assert_close(r.vectors[0], v)
    index.refresh()
    r2 = index.search_other_class(q, yq, 3)
    assert torch.equal(r2.ids, r.ids) if kind in ("flat",) else 0 not in r2.ids[0].tolist()


@pytest.mark.parametrize("kind,inplace", [("flat", None), ("ivfpq", False), ("ivfpq", None), ("ivf", None)])
def test_a_new_row_is_found_before_refresh_and_after(kind, inplace):
    x, y = base_data(seed=1)
    index = make_index(kind, DIM, 3, refresh_every=0, **({} if inplace is None else {"inplace": inplace}))
    assert index.inplace == (kind in ("ivf", "ivfpq") and inplace is None)
    index.upsert(torch.arange(600), x, y)
    index.build()
    assert index.delta_size == 0
    target = torch.full((1, DIM), 3.0)
    index.upsert(torch.tensor([10_000]), target, torch.tensor([2]))  # a new id, not in the structure
    # in place: written into the lists at once; otherwise searched exactly until the next refresh
    assert index.delta_size == (0 if index.inplace else 1)
    assert index.engine.ntotal == (601 if index.inplace else 600)
    for _ in range(2):
        r = index.search_other_class(target + 0.01, torch.tensor([0]), 1)
        assert r.ids[0, 0] == 10_000 and r.labels[0, 0] == 2
        assert abs(r.distances[0, 0].item() - 0.01 * math.sqrt(DIM)) < 1e-5
        index.refresh()
        assert index.delta_size == 0 and index.last_refresh_s is not None


def test_a_sample_never_returns_itself_and_label_changes_are_respected():
    x, y = base_data(seed=2)
    ids = torch.arange(600) + 5
    index = make_index("ivfpq", DIM, 3, refresh_every=0)
    index.upsert(ids, x, y)
    index.build()
    r = index.search_same_class(x[:50], y[:50], 2, query_ids=ids[:50])
    assert not (r.ids == ids[:50].unsqueeze(1)).any()
    # Sample 5 changes class 0 -> 1 (or 1 -> 2 ...): it must now be found only as its new class.
    new = (int(y[0]) + 1) % 3
    index.upsert(ids[:1], x[:1], torch.tensor([new]))
    probe = x[:1] + 1e-3
    assert index.search_other_class(probe, torch.tensor([new]), 5).ids[0].tolist().count(5) == 0
    assert index.search_same_class(probe, torch.tensor([new]), 1).ids[0, 0] == 5
    assert index.counts() == torch.bincount(torch.cat([torch.tensor([new]), y[1:]]), minlength=3).tolist()


def test_refresh_every_counts_upserts():
    x, y = base_data(seed=3)
    index = FaissIndex(DIM, 3, kind="ivf", refresh_every=3, background=False, inplace=False)
    for i in range(7):
        index.upsert(torch.arange(i * 50, i * 50 + 50), x[i * 50:(i + 1) * 50], y[i * 50:(i + 1) * 50])
        expected_delta = 50 * ((i + 1) % 3)
        assert index.delta_size == expected_delta, i
    assert index.engine.ntotal == 300 and len(index) == 350
    # Re-upserting rows already in the delta does not add them twice.
    index.upsert(torch.arange(300, 350), x[300:350] + 1, y[300:350])
    assert index.delta_size == 50 and len(index) == 350
    index.upsert(torch.arange(300, 350), x[300:350], y[300:350])  # third call since the refresh
    assert index.delta_size == 0 and index.engine.ntotal == 350


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])  # plain array lists and fast-scan blocks
def test_in_place_updates_keep_the_delta_empty_and_find_moved_rows_at_once(kind):
    x, y = base_data(n=3000, seed=8)
    index = FaissIndex(DIM, 3, kind=kind, refresh_every=0)
    index.upsert(torch.arange(3000), x, y)
    index.build()
    exact = make_index("exact", DIM, 3)
    exact.upsert(torch.arange(3000), x, y)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        rows = torch.randperm(3000, generator=g)[:200]
        v = x[rows] + 0.5 * torch.randn(200, DIM, generator=g)
        lab = torch.where(torch.rand(200, generator=g) < 0.1, (y[rows] + 1) % 3, y[rows])  # some change class
        for ix in (index, exact):
            ix.upsert(rows, v, lab)
        x[rows], y[rows] = v, lab
    assert index.delta_size == 0 and index.engine.index.ntotal == 3000
    rows, lists = _entries(index.engine)
    assert sorted(rows.tolist()) == list(range(3000))  # one entry per row: the moved rows left their old lists
    # Each moved row is found through its new entry: querying with its exact vector from another class
    q = torch.randperm(3000, generator=g)[:100]
    yq = (y[q] + 1) % 3
    r = index.search_other_class(x[q], yq, 1)
    assert torch.equal(r.ids[:, 0], q) and torch.equal(r.labels[:, 0], y[q])
    # and results are exact distances of fresh vectors, never closer than the truth, mostly the truth
    a = index.search_other_class(x[:300], y[:300], 3, query_ids=torch.arange(300))
    b = exact.search_other_class(x[:300], y[:300], 3, query_ids=torch.arange(300))
    assert (a.distances >= b.distances - 1e-4).all()
    assert (a.ids[:, 0] == b.ids[:, 0]).float().mean() >= 0.9
    assert len(set(a.ids[0].tolist())) == 3
    index.refresh()
    assert index.engine.index.ntotal == 3000


def test_a_background_rebuild_is_swapped_in_at_a_fixed_step_and_newer_rows_drain_into_it():
    x, y = base_data(seed=3)
    index = FaissIndex(DIM, 3, kind="ivfpq", refresh_every=4)  # swap 4 // 2 = 2 upserts after the start
    assert index.background and index.inplace
    for i in range(4):
        index.upsert(torch.arange(i * 50, i * 50 + 50), x[i * 50:(i + 1) * 50], y[i * 50:(i + 1) * 50])
    assert index._job is not None and not index.engine.built and index.delta_size == 200  # old structure in use
    index.upsert(torch.arange(200, 250), x[200:250], y[200:250])
    assert index._job is not None and index.delta_size == 250
    index.upsert(torch.arange(0, 50), x[:50] * 0.5, y[:50])  # second upsert: swapped, then drained
    assert index._job is None and index.engine.built and index.last_refresh_s > 0
    # rows 200-249 (new) and 0-49 (moved) were written after the start: they went to the delta at the
    # swap and (at least 1024 rows per upsert) straight on into the new structure
    assert index.delta_size == 0 and index.engine.ntotal == 250
    r = index.search_other_class(x[:50] * 0.5, y[:50], 1, query_ids=torch.arange(50))
    exact = make_index("exact", DIM, 3)
    exact.upsert(torch.arange(250), torch.cat([x[:50] * 0.5, x[50:250]]), y[:250])
    want = exact.search_other_class(x[:50] * 0.5, y[:50], 1, query_ids=torch.arange(50))
    assert (r.distances[:, 0] >= want.distances[:, 0] - 1e-5).all()
    assert (r.ids[:, 0] == want.ids[:, 0]).float().mean() >= 0.8


def test_a_background_rebuild_is_swapped_in_at_a_fixed_step_and_newer_rows_stay_in_the_delta():
    x, y = base_data(seed=3)
    index = FaissIndex(DIM, 3, kind="ivf", refresh_every=4, inplace=False)  # swap 4 // 2 = 2 upserts later
    assert index.background
    for i in range(8):
        index.upsert(torch.arange(i * 50, i * 50 + 50), x[i * 50:(i + 1) * 50], y[i * 50:(i + 1) * 50])
    index._finish_rebuild()
    index.refresh()  # a clean start: 400 rows built, empty delta
    for i in range(3):
        index.upsert(torch.arange(300 + i, 301 + i), x[300 + i:301 + i], y[300 + i:301 + i])
    index.upsert(torch.arange(300, 350), x[300:350], y[300:350])  # fourth: a rebuild starts
    assert index._job is not None and index.delta_size == 50
    index.upsert(torch.arange(400, 450), x[400:450], y[400:450])
    assert index._job is not None and index.delta_size == 100
    index.upsert(torch.arange(0, 50), x[:50] * 0.5, y[:50])  # second upsert: swapped
    assert index._job is None and index.engine.ntotal == 400 and index.last_refresh_s > 0
    assert index.delta_size == 100  # rows 400-449 (new) and 0-49 (moved) were written after the start
    r = index.search_other_class(x[:50] * 0.5, y[:50], 1, query_ids=torch.arange(50), return_vectors=True)
    exact = make_index("exact", DIM, 3)
    exact.upsert(torch.arange(450), torch.cat([x[:50] * 0.5, x[50:450]]), y[:450])
    want = exact.search_other_class(x[:50] * 0.5, y[:50], 1, query_ids=torch.arange(50))
    assert (r.distances[:, 0] >= want.distances[:, 0] - 1e-5).all()  # never closer than the truth: fresh vectors


def stream_searches(n, seed, refresh_every, steps, batch, generator_seed):
    """Search then upsert moved rows, step by step, with a background rebuild at every periodic
    refresh (retrain="always": small moves alone would skip them). Returns every step's (ids,
    distances) and the index."""
    x, y = base_data(n=n, seed=seed)
    index = make_index("ivfpq", DIM, 3, refresh_every=refresh_every, retrain="always")
    assert index.background
    index.upsert(torch.arange(n), x, y)
    index.build()
    g = torch.Generator().manual_seed(generator_seed)
    out = []
    for _ in range(steps):
        rows = torch.randperm(n, generator=g)[:batch]
        v = x[rows] + 0.05 * torch.randn(batch, DIM, generator=g)
        r = index.search_other_class(v, y[rows], 2, query_ids=rows)
        out.append((r.ids, r.distances))
        index.upsert(rows, v, y[rows])
        x[rows] = v
    assert index.rebuilds >= 2  # the build, and at least one rebuild swapped in from the background
    return out, index


def test_background_rebuilds_are_reproducible():
    a, _ = stream_searches(2000, 5, 8, 40, 64, 1)
    b, _ = stream_searches(2000, 5, 8, 40, 64, 1)
    assert all(torch.equal(i, j) and torch.equal(d, e) for (i, d), (j, e) in zip(a, b))


def test_the_rebuild_thread_writes_newer_rows_into_the_new_structure_before_the_swap():
    """With in-place updates the thread catches up itself: at the swap nothing is left to drain."""
    x, y = base_data(seed=4)
    index = FaissIndex(DIM, 3, kind="ivfpq", refresh_every=8)  # swap 4 upserts after the start
    index.upsert(torch.arange(400), x[:400], y[:400])
    index.build()
    for i in range(8):  # the eighth starts a rebuild (the rows moved far: the centroids no longer fit)
        index.upsert(torch.arange(i * 10, i * 10 + 10), x[i * 10:i * 10 + 10] * 3, y[i * 10:i * 10 + 10])
    job = index._job
    assert job is not None and job.catch_up
    index.upsert(torch.arange(400, 450), x[400:450], y[400:450])  # new rows, written during the rebuild
    index.upsert(torch.arange(0, 20), x[:20] * 0.5, y[:20])  # moved rows
    deadline = time.monotonic() + 60
    while (job.pending or job.engine.ntotal < 450) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not job.pending and job.engine.ntotal == 450  # written by the thread, before any swap
    assert index._job is job  # not swapped yet
    index.upsert(torch.arange(450, 460), x[450:460], y[450:460])
    index.upsert(torch.arange(460, 470), x[460:470], y[460:470])  # fourth upsert: swapped
    assert index._job is None and index.engine is job.engine and index.delta_size == 0
    r = index.search_other_class(x[:20] * 0.5, y[:20], 1, query_ids=torch.arange(20))
    exact = make_index("exact", DIM, 3)
    exact.upsert(torch.arange(470), torch.cat([x[:20] * 0.5, x[20:80] * 3, x[80:470]]), y[:470])
    want = exact.search_other_class(x[:20] * 0.5, y[:20], 1, query_ids=torch.arange(20))
    assert (r.distances[:, 0] >= want.distances[:, 0] - 1e-5).all()
    assert (r.ids[:, 0] == want.ids[:, 0]).float().mean() >= 0.8


def test_the_swapped_structure_does_not_depend_on_how_far_the_thread_got(monkeypatch):
    """Whether the thread applied the newer writes or the swap had to wait for them, the searches
    after the swap are identical (each write batch is applied once, in order)."""
    from faiss_index.streaming.partitioned_ivf import PartitionedIVF

    fast, first = stream_searches(1500, 8, 6, 20, 50, 2)
    build = PartitionedIVF.build_prepared

    def slow(self, job):
        time.sleep(0.3)  # the swap, 3 upserts later, comes before the build is done
        build(self, job)

    monkeypatch.setattr(PartitionedIVF, "build_prepared", slow)
    late, second = stream_searches(1500, 8, 6, 20, 50, 2)
    assert all(torch.equal(i, j) and torch.equal(d, e) for (i, d), (j, e) in zip(fast, late))
    # the slow build read the store after the rows written meanwhile, and still saw it as it was
    assert torch.equal(first.engine.centroids, second.engine.centroids)


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread priorities are a POSIX feature")
def test_the_rebuild_runs_at_the_lowest_priority(monkeypatch):
    from faiss_index.streaming.partitioned_ivf import PartitionedIVF

    seen = []
    build = PartitionedIVF.build_prepared
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def spy(self, job):
        seen.append((threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        build(self, job)

    monkeypatch.setattr(PartitionedIVF, "build_prepared", spy)
    x, y = base_data(seed=9)
    index = FaissIndex(DIM, 3, kind="ivf", refresh_every=2)
    index.upsert(torch.arange(300), x[:300], y[:300])
    index.build()
    index.upsert(torch.arange(10), x[:10] * 3, y[:10])
    index.upsert(torch.arange(10), x[:10] * 3, y[:10])  # the second starts the rebuild (the rows moved far)
    index._finish_rebuild()
    assert seen == [("MainThread", base), ("faiss-index-rebuild", 19)]  # index.build() runs here, as it was
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # this thread is untouched


def test_a_failed_background_rebuild_is_raised_at_the_swap_and_the_index_still_answers(monkeypatch):
    x, y = base_data(seed=6)
    index = FaissIndex(DIM, 3, kind="ivf", refresh_every=4)
    index.upsert(torch.arange(300), x[:300], y[:300])
    index.build()
    engine_type = type(index.engine)

    def broken(self, prepared):
        raise RuntimeError("out of memory while rebuilding")

    monkeypatch.setattr(engine_type, "build_prepared", broken)
    for i in range(5):  # the fourth starts the rebuild (the rows moved far), the sixth swaps it in
        index.upsert(torch.arange(i * 10, i * 10 + 10), x[i * 10:i * 10 + 10] * 3, y[i * 10:i * 10 + 10])
    with pytest.raises(RuntimeError, match="out of memory while rebuilding"):
        index.upsert(torch.arange(300, 310), x[300:310], y[300:310])
    monkeypatch.undo()
    # the old structure stays in use; the rows of the failing call were already written into it
    assert index.engine.ntotal == 310 and len(index) == 310
    r = index.search_other_class(x[:5], y[:5], 1, query_ids=torch.arange(5))
    assert (r.ids[:, 0] >= 0).all()


def test_saving_during_a_background_rebuild_finishes_it_first(tmp_path):
    from faiss_index import load_index, save_index

    x, y = base_data(seed=7)
    index = FaissIndex(DIM, 3, kind="ivfpq", refresh_every=4)
    for i in range(4):  # the fourth upsert starts a rebuild
        index.upsert(torch.arange(i * 100, i * 100 + 100), x[i * 100:(i + 1) * 100], y[i * 100:(i + 1) * 100])
    assert index._job is not None
    save_index(index, tmp_path / "idx", classes=["a", "b", "c"])
    assert index._job is None
    loaded, _ = load_index(tmp_path / "idx")
    for ix in (index, loaded):
        ix.upsert(torch.arange(400, 600), x[400:600], y[400:600])
    a = index.search_other_class(x[:100], y[:100], 3, query_ids=torch.arange(100))
    b = loaded.search_other_class(x[:100], y[:100], 3, query_ids=torch.arange(100))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.distances, b.distances)


def test_bulk_load_then_build_has_no_per_batch_cost():
    x, y = base_data(n=3000, seed=4)
    index = make_index("ivfpq", DIM, 3, refresh_every=5)
    index.upsert(torch.arange(3000), x, y)  # one call: no refresh yet, everything in the delta
    assert index.delta_size == 3000 and not index.engine.built
    index.build()
    assert index.delta_size == 0 and index.engine.ntotal == 3000 and index.last_refresh_s > 0


def test_empty_index_and_empty_classes():
    index = make_index("ivfpq", DIM, 4)
    r = index.search_other_class(torch.zeros(2, DIM), [0, 1], 2)
    assert r.ids.eq(-1).all() and torch.isinf(r.distances).all() and r.labels.eq(-1).all()
    index.upsert([1, 2], torch.stack([torch.ones(DIM), torch.full((DIM,), 2.0)]), [3, 3])
    index.build()
    r = index.search_other_class(torch.zeros(2, DIM), [3, 0], 1, return_vectors=True)
    assert r.ids[:, 0].tolist() == [-1, 1] and r.vectors[0].eq(0).all() and r.vectors[1].eq(1).all()


# ------------------------------------------------------------------------- property test
POOL = 24  # sample ids 0..23; small enough that tiny IVF/PQ indexes stay exact (one list, full re-rank)

op = st.one_of(
    st.tuples(st.just("upsert"), st.lists(st.tuples(st.integers(0, POOL - 1), st.integers(0, 3),
                                                     st.lists(st.integers(-3, 3), min_size=4, max_size=4)),
                                           min_size=1, max_size=6)),
    st.tuples(st.just("search"), st.tuples(st.lists(st.integers(-3, 3), min_size=4, max_size=4), st.integers(0, 3),
                                           st.one_of(st.none(), st.integers(0, POOL - 1)), st.booleans(),
                                           st.integers(1, 3))),
    st.tuples(st.just("refresh"), st.none()),
)


def model_search(model, q, label, qid, same, k):
    cands = sorted((math.dist(q, v), i) for i, (v, lab) in model.items()
                   if (lab == label) == same and i != qid)
    return [d for d, _ in cands[:k]]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["exact", "flat", "ivfpq", "ivf", "flat/global", "ivf/global"]),
       ops=st.lists(op, min_size=1, max_size=14), refresh_every=st.integers(0, 3))
def test_other_class_search_matches_a_brute_force_model(kind, ops, refresh_every):
    kind, _, strategy = kind.partition("/")
    params = {} if kind == "exact" else {"refresh_every": refresh_every, "rerank": POOL}
    if strategy:
        params.update(strategy=strategy, nprobe=POOL)  # exhaustive: the property is about streaming
    index = make_index(kind, 4, 4, **params)
    model: dict[int, tuple[list[float], int]] = {}
    for name, arg in ops:
        if name == "upsert":
            for i, lab, v in arg:  # last duplicate wins, as in the index
                model[i] = ([float(t) for t in v], lab)
            index.upsert([a[0] for a in arg], torch.tensor([a[2] for a in arg], dtype=torch.float32),
                         [a[1] for a in arg])
        elif name == "refresh":
            index.refresh()
        else:
            q, label, qid, same, k = arg
            search = index.search_same_class if same else index.search_other_class
            r = search(torch.tensor([q], dtype=torch.float32), [label], k,
                       query_ids=None if qid is None else [qid], return_vectors=True)
            want = model_search(model, [float(t) for t in q], label, qid, same, k)
            got = [d for d in r.distances[0].tolist() if not math.isinf(d)]
            assert got == pytest.approx(want, abs=1e-5)
            assert len(set(i for i in r.ids[0].tolist() if i >= 0)) == len(got)  # no duplicates
            for j, i in enumerate(r.ids[0].tolist()):
                if i < 0:
                    assert r.labels[0, j] == -1 and r.vectors[0, j].eq(0).all()
                    continue
                vec, lab = model[i]
                assert (lab == label) == same and i != qid
                assert r.labels[0, j] == lab and r.vectors[0, j].tolist() == vec
    assert len(index) == len(model)
    assert index.counts() == [sum(1 for _, lab in model.values() if lab == c) for c in range(4)]


def test_refresh_reuses_the_codebook_and_re_encodes_changed_rows():
    from faiss_index.quantizers.pq import encode_pq, pack_codes

    x, y = base_data(n=2000, seed=5)
    index = make_index("ivfpq", DIM, 3, refresh_every=0)
    index.upsert(torch.arange(2000), x, y)
    index.build()
    book = index.engine._pq["centroids"]
    moved = torch.arange(0, 2000, 50)
    index.upsert(moved, x[moved] + 0.05, y[moved])
    index.upsert(torch.tensor([5000]), x[:1], y[:1])  # and a new row
    index.refresh()
    pq = index.engine._pq
    assert pq["centroids"] is book  # small drift: the codebook is kept
    vectors, _, _ = index.store.view()
    assert (pq["codes"] == pack_codes(encode_pq(vectors, book), 4)).all()
    # A large drift retrains it.
    index.upsert(torch.arange(2000), x * 3, y)
    index.refresh()
    assert index.engine._pq["centroids"] is not book
    assert len(index.delta) == 0 and index.delta.rows.shape[0] <= 1 << 17


def _entries(engine):
    """(row, list) of every entry of the engine's faiss lists."""
    import faiss
    import numpy as np

    inv = engine.index.invlists
    rows, lists = [], []
    for lno in range(engine.index.nlist):
        n = inv.list_size(lno)
        if n:
            rows.append(np.array(faiss.rev_swig_ptr(inv.get_ids(lno), n)))
            lists.append(np.full(n, lno))
    return torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(lists))


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_periodic_refreshes_are_skipped_until_the_data_drifts(kind):
    from faiss_index.quantizers.kmeans import assign

    x, y = base_data(n=3000, seed=11)
    index = make_index(kind, DIM, 3, refresh_every=2, background=False)
    index.upsert(torch.arange(3000), x, y)
    index.build()
    engine = index.engine
    cents = engine.centroids.clone()
    g = torch.Generator().manual_seed(0)
    for step in range(6):  # small moves: three periodic refreshes, all skipped
        moved = torch.randperm(3000, generator=g)[:300]
        x[moved] += 0.02 * torch.randn(len(moved), DIM, generator=g)
        index.upsert(moved, x[moved], y[moved])
    assert index.refreshes_skipped == 3 and torch.equal(engine.centroids, cents)
    rows, lists = _entries(engine)
    assert sorted(rows.tolist()) == list(range(3000))  # one entry per row ...
    order = rows.argsort()
    offsets = torch.tensor([0] + engine.nlist_per_class).cumsum(0)
    for c in range(3):  # ... in the nearest list of its class for its newest vector
        lo, hi = int(offsets[c]), int(offsets[c + 1])
        sel = (y == c).nonzero().squeeze(1)
        want, _ = assign(x[sel], cents[lo:hi])
        assert torch.equal(lists[order][sel], want + lo)
    # once the rows written lie much farther from the centroids, the next periodic refresh retrains them
    index.upsert(torch.arange(3000), x * 3, y)
    index.upsert(torch.arange(10), x[:10] * 3, y[:10])
    assert index.refreshes_skipped == 3 and not torch.equal(index.engine.centroids, cents)


def test_retrain_always_rebuilds_at_every_periodic_refresh():
    x, y = base_data(n=2000, seed=12)
    index = make_index("ivfpq", DIM, 3, refresh_every=2, background=False, retrain="always")
    index.upsert(torch.arange(2000), x, y)
    index.build()
    for _ in range(6):  # no drift at all: the same vectors again
        index.upsert(torch.arange(100), x[:100], y[:100])
    assert index.refreshes_skipped == 0 and index.rebuilds == 1 + 3 and index.params["retrain"] == "always"
    with pytest.raises(IndexInputError, match="retrain must be one of drift, always"):
        make_index("ivfpq", DIM, 3, retrain="sometimes")


def test_a_process_that_ends_during_a_background_rebuild_exits_cleanly():
    """The rebuild thread is joined at exit: no "terminate called without an active exception" abort."""
    import subprocess
    import sys

    code = ("import torch; from faiss_index import make_index\n"
            "x = torch.nn.functional.normalize(torch.randn(20000, 16), dim=1); y = torch.randint(0, 3, (20000,))\n"
            "ix = make_index('ivfpq', 16, 3, refresh_every=2)\n"
            "ix.upsert(torch.arange(20000), x, y); ix.upsert(torch.arange(100), x[:100], y[:100])\n"
            "assert ix._job is not None\n"
            "import time; time.sleep(1)\n")  # built by now: the thread waits for writes to catch up on
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "terminate" not in run.stderr, run.stderr[-1000:]


def test_a_bulk_load_keeps_one_copy_of_the_vectors_and_is_searched_exactly():
    from faiss_index import knn_other_class

    x, y = base_data(n=5000, seed=5)
    index = make_index("ivfpq", DIM, 3, refresh_every=0)
    index.reserve(5000)
    for s in range(0, 5000, 1000):
        index.upsert(torch.arange(s, s + 1000), x[s:s + 1000], y[s:s + 1000])
    assert index.store.capacity == 5000  # reserved exactly: no doubling past the load
    assert index.delta.nbytes() < 200_000  # the delta holds no copy of an unbuilt index's rows
    q, yq = x[:50] + 0.01, (y[:50] + 1) % 3
    d_true, i_true = knn_other_class(q, yq, x, y, 3)
    r = index.search_other_class(q, yq, 3)
    assert torch.equal(r.ids, i_true) and torch.allclose(r.distances, d_true)  # exact before the build
    index.build()
    index.upsert(torch.arange(10), x[:10] * 2, y[:10])
    assert index.delta_size == 0 and index.engine.index.ntotal == 5000  # after the build: moved in place


def test_a_float16_store_streams_like_a_float32_one():
    """Upserts, the exact delta, background refreshes and re-ranking read a float16 store as float32:
    the same neighbours as the float32 index except at near-ties, and every distance exact for the
    stored (rounded) vectors."""
    pytest.importorskip("faiss")
    x, y = clustered(3000, 16, 3, clusters_per_class=8, spread=0.5, seed=2)
    ids = torch.arange(3000)
    a, b = (make_index("ivfpq", 16, 3, refresh_every=5, store_dtype=dtype) for dtype in ("float16", "float32"))
    g = torch.Generator().manual_seed(1)
    for index in (a, b):
        index.upsert(ids, x, y)
        index.build()
    agree = []
    for step in range(12):
        rows = torch.randperm(3000, generator=g)[:64]
        moved = x[rows] + 0.05 * torch.randn(64, 16, generator=g)
        ra, rb = (index.search_other_class(moved, y[rows], 1, query_ids=rows) for index in (a, b))
        agree.append((ra.ids[:, 0] == rb.ids[:, 0]).float().mean().item())
        v, _ = a.get(ra.ids[:, 0])
        torch.testing.assert_close(ra.distances[:, 0], (v - moved).norm(dim=1), atol=1e-4, rtol=1e-4)
        for index in (a, b):
            index.upsert(rows, moved, y[rows])
    assert a.store.vectors.dtype == torch.float16 and sum(agree) / len(agree) >= 0.97


def test_in_place_appends_to_a_list_that_fills_whole_fast_scan_blocks():
    """A fast-scan list of exactly a multiple of its block size in bytes: faiss' own add_entries copies
    past the list there, so the engine grows the list and packs codes itself. Every appended code must
    read back as written, and the new rows must be found through them."""
    faiss = pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(9)
    x = torch.randn(256, DIM, generator=g)
    y = torch.cat([torch.zeros(128, dtype=torch.int64), torch.ones(128, dtype=torch.int64)])
    # rerank 192: every candidate re-ranked, so the search checks the codes' rows, not the codes' ranking
    # (the new rows lie far from the data the codebook was trained on, so their codes rank them coarsely)
    index = FaissIndex(DIM, 2, kind="ivfpq", nlist=1, refresh_every=0, rerank=192)
    index.upsert(torch.arange(256), x, y)
    index.build()
    inv = faiss.downcast_InvertedLists(index.engine.index.invlists)
    assert inv.list_size(0) == 128 and inv.packer.block_size == 128  # 32 codes of 4 bytes per block
    new = torch.arange(256, 376)
    v = torch.randn(120, DIM, generator=g) + 5.0
    for step in range(3):  # 128 -> 168 -> 208 -> 248 entries, crossing block boundaries
        part = slice(step * 40, step * 40 + 40)
        index.upsert(new[part], v[part], torch.zeros(40, dtype=torch.int64))
    assert inv.list_size(0) == 248
    ids = faiss.rev_swig_ptr(inv.get_ids(0), 248)
    assert sorted(ids[128:].tolist()) == new.tolist()
    r = index.search_other_class(v, torch.ones(120, dtype=torch.int64), 1)
    assert torch.equal(r.ids[:, 0], new) and r.distances[:, 0].abs().max() < 1e-4


@pytest.mark.parametrize("same_class", [False, True])
def test_the_probe_mask_follows_lists_that_empty_and_fill_in_place(same_class):
    """The per-class probe bias is cached; in-place moves that empty a list (or fill an empty one)
    must show in the lists a query may probe, exactly as a mask computed afresh."""
    x, y = base_data(n=2000, seed=3)
    index = make_index("ivf", DIM, 3, refresh_every=0, nlist=16, probe_recall=0)
    index.upsert(torch.arange(2000), x, y)
    index.build()
    eng = index.engine

    def fresh(xq, yq):
        score = torch.addmm(eng._c_sq, xq, eng.centroids.T, alpha=-2.0)
        lc = eng.list_class.unsqueeze(0)
        excluded = (lc != yq.unsqueeze(1)) if same_class else (lc == yq.unsqueeze(1))
        return score.masked_fill(excluded | (eng.list_size == 0).unsqueeze(0), float("inf"))

    xq, yq = x[:64], y[:64]
    assert torch.allclose(eng._list_scores(xq, yq, same_class), fresh(xq, yq))
    # empty list 0 (class 0): its rows move to where another list of class 0 is nearest
    members = (torch.from_numpy(eng._lists.row_list[:2000]) == 0).nonzero().squeeze(1)
    target = eng.centroids[1] if int(eng.list_class[1]) == int(eng.list_class[0]) else eng.centroids[-1]
    moved = target.expand(members.numel(), -1).clone()
    index.upsert(members, moved, y[members])
    assert int(eng.list_size[0]) == 0
    a = eng._list_scores(xq, yq, same_class)
    assert torch.equal(torch.isinf(a), torch.isinf(fresh(xq, yq))) and torch.isinf(a[:, 0]).all()
    # fill it again: list 0 is probed again by the queries allowed to
    index.upsert(members, x[members], y[members])
    assert int(eng.list_size[0]) > 0
    a = eng._list_scores(xq, yq, same_class)
    assert torch.equal(torch.isinf(a), torch.isinf(fresh(xq, yq))) and not torch.isinf(a[:, 0]).all()
