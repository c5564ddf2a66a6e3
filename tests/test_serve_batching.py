"""SearchBatcher: queued searches are coalesced into one index call, and nobody's answer changes."""
import asyncio
import threading

import numpy as np
import pytest
import torch

from faiss_index import make_index
from faiss_index.service.batching import SearchBatcher
from faiss_index.synthetic import clustered

DIM = 16


def run_in_thread(fn, *args):
    return asyncio.get_running_loop().run_in_executor(None, fn, *args)


class FakeSearch:
    """Answers ids = query index * 10 + position; the first call blocks until released."""

    def __init__(self, fail_on=None):
        self.calls = []
        self.release = threading.Event()
        self.fail_on = fail_on

    def __call__(self, xq, yq, k):
        self.calls.append(len(xq))
        if len(self.calls) == 1:
            self.release.wait(5)
        if self.fail_on is not None and (xq[:, 0] == self.fail_on).any():
            raise ValueError("bad query")
        ids = (xq[:, :1].astype(np.int64) * 10 + np.arange(k)).astype(np.int64)
        return {"ids": ids, "labels": np.repeat(yq[:, None], k, axis=1)}


def queries(tag, n=2):
    x = np.full((n, DIM), float(tag), np.float32)
    return x, np.full(n, tag % 3, np.int64)


def test_requests_queued_behind_a_busy_slot_go_as_one_batch_with_their_own_answers():
    search = FakeSearch()

    async def main():
        b = SearchBatcher(run_in_thread, search, slots=1, max_queries=1024)
        first = asyncio.ensure_future(b.submit(*queries(1), 3, dict))
        await asyncio.sleep(0.05)  # the first holds the only slot
        rest = [asyncio.ensure_future(b.submit(*queries(t), 3, dict)) for t in (2, 3, 4)]
        other_k = asyncio.ensure_future(b.submit(*queries(5), 4, dict))
        await asyncio.sleep(0.05)
        search.release.set()
        return await first, await asyncio.gather(*rest), await other_k, b

    first, rest, other_k, b = asyncio.run(main())
    assert search.calls == [2, 6, 2]  # alone; then the three with k=3 together; then the one with k=4
    assert b.batches == 3 and b.requests == 5
    for tag, answer in zip((1, 2, 3, 4), [first, *rest]):
        assert answer["ids"].tolist() == [[tag * 10, tag * 10 + 1, tag * 10 + 2]] * 2
        assert answer["labels"].tolist() == [[tag % 3] * 3] * 2
    assert other_k["ids"].shape == (2, 4)


def test_a_failing_request_fails_alone():
    search = FakeSearch(fail_on=3)

    async def main():
        b = SearchBatcher(run_in_thread, search, slots=1, max_queries=1024)
        first = asyncio.ensure_future(b.submit(*queries(1), 2, dict))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(b.submit(*queries(t), 2, dict)) for t in (2, 3, 4)]
        await asyncio.sleep(0.05)
        search.release.set()
        await first
        return await asyncio.gather(*rest, return_exceptions=True)

    good, bad, good2 = asyncio.run(main())
    assert isinstance(bad, ValueError)
    assert good["ids"][0, 0] == 20 and good2["ids"][0, 0] == 40


def test_a_batch_never_exceeds_max_queries():
    search = FakeSearch()

    async def main():
        b = SearchBatcher(run_in_thread, search, slots=1, max_queries=5)
        first = asyncio.ensure_future(b.submit(*queries(1), 1, dict))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(b.submit(*queries(t), 1, dict)) for t in range(2, 7)]
        await asyncio.sleep(0.05)
        search.release.set()
        await first
        return await asyncio.gather(*rest)

    asyncio.run(main())
    assert search.calls[0] == 2 and all(c <= 5 for c in search.calls) and sum(search.calls) == 12


@pytest.mark.parametrize("kind", ["exact", "ivfpq"])
def test_one_query_answer_does_not_depend_on_its_batch(kind):
    """What makes coalescing safe: searching requests together gives each the answer it gets alone."""
    pytest.importorskip("faiss") if kind != "exact" else None
    x, y = clustered(3000, DIM, 3, clusters_per_class=5, seed=1)
    index = make_index(kind, DIM, 3, refresh_every=0)
    index.upsert(torch.arange(3000), x, y)
    if kind != "exact":
        index.build()
    index.upsert(torch.arange(100), x[:100] + 0.05, y[:100])  # written after the build
    q, yq = x[500:596] + 0.01, (y[500:596] + 1) % 3
    together = index.search_other_class(q, yq, 5)
    for s in range(0, 96, 32):
        alone = index.search_other_class(q[s:s + 32], yq[s:s + 32], 5)
        assert torch.equal(alone.ids, together.ids[s:s + 32])
        assert torch.equal(alone.distances, together.distances[s:s + 32])
