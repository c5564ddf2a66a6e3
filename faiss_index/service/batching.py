"""SearchBatcher: concurrent search requests coalesced into one index call.

A search of 32 queries spends most of its server time in per-call overhead (torch dispatch, the
coarse step, faiss' scan setup, re-ranking) rather than per query, so under load the service
answers many requests with one call. There is no timer: a request that finds a free search slot
is searched at once (no added latency when the server is idle); requests that arrive while every
slot is busy queue, and the next free slot takes all queued requests with the same ``k`` (up to
``max_queries`` vectors) as one batch. Each query's candidates and re-ranking are its own, so a
query gets the same answer in a batch as alone (tests/test_serve_batching.py checks ids and
distances bit for bit; a different matrix-product blocking could change the last bit of a distance).
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

LOG = logging.getLogger(__name__)

__all__ = ["SearchBatcher"]


@dataclass
class _Request:
    xq: np.ndarray
    yq: np.ndarray
    k: int
    encode: Callable[[dict], Any]
    future: asyncio.Future = field(default=None)


class SearchBatcher:
    """Coalesces queued searches into batches.

    Args:
        run: ``async run(fn, *args)``: runs the blocking ``fn`` in a worker thread under the index's
            read lock (the app's ``read``), returning its result.
        search: blocking ``search(xq, yq, k) -> dict of (Q, k) arrays`` (``IndexService.search``).
        slots: batches searched at once (the service's search threads).
        max_queries: most query vectors in one batch (a single larger request still goes alone).
    """

    def __init__(self, run, search, slots: int, max_queries: int):
        self.run = run
        self.search = search
        self.slots = max(1, int(slots))
        self.max_queries = max(1, int(max_queries))
        self.queue: deque[_Request] = deque()
        self.busy = 0
        self.batches = 0
        self.requests = 0

    async def submit(self, xq: np.ndarray, yq: np.ndarray, k: int, encode: Callable[[dict], Any]) -> Any:
        """Search xq (Q, D) float32 / yq (Q,) int64 with k neighbours; returns ``encode(answer)``."""
        req = _Request(xq, yq, k, encode, asyncio.get_running_loop().create_future())
        self.queue.append(req)
        self._start()
        return await req.future

    def _start(self) -> None:
        while self.queue and self.busy < self.slots:
            self.busy += 1
            asyncio.get_running_loop().create_task(self._serve(self._take()))

    def _take(self) -> list[_Request]:
        """The oldest queued request and every later one with the same k, up to max_queries vectors."""
        first = self.queue.popleft()
        batch, n, keep = [first], len(first.xq), deque()
        while self.queue:
            req = self.queue.popleft()
            if req.k == first.k and n + len(req.xq) <= self.max_queries:
                batch.append(req)
                n += len(req.xq)
            else:
                keep.append(req)
        self.queue = keep
        return batch

    async def _serve(self, batch: list[_Request]) -> None:
        try:
            try:
                answers = await self.run(self._search_batch, batch)
            except Exception as e:  # noqa: BLE001 - one request's fault must not fail the others
                if len(batch) == 1:
                    answers = [e]
                else:
                    LOG.warning("a coalesced search of %d requests failed (%s); searching them one by one",
                                len(batch), e)
                    answers = []
                    for req in batch:
                        try:
                            answers.extend(await self.run(self._search_batch, [req]))
                        except Exception as e1:  # noqa: BLE001
                            answers.append(e1)
            for req, answer in zip(batch, answers):
                if req.future.done():  # the client went away
                    continue
                if isinstance(answer, BaseException):
                    req.future.set_exception(answer)
                else:
                    req.future.set_result(answer)
        finally:
            self.busy -= 1
            self.batches += 1
            self.requests += len(batch)
            self._start()

    def _search_batch(self, batch: list[_Request]) -> list[Any]:
        """Blocking: one index search for the whole batch, then each request's slice encoded."""
        if len(batch) == 1:
            req = batch[0]
            return [req.encode(self.search(req.xq, req.yq, req.k))]
        xq = np.concatenate([r.xq for r in batch])
        yq = np.concatenate([r.yq for r in batch])
        res = self.search(xq, yq, batch[0].k)
        out, start = [], 0
        for req in batch:
            end = start + len(req.xq)
            out.append(req.encode({name: v[start:end] for name, v in res.items()}))
            start = end
        return out
