"""A readers-writer lock for asyncio: searches share the index, upserts and snapshots hold it alone."""
from __future__ import annotations

import asyncio
import contextlib
import logging

LOG = logging.getLogger(__name__)

__all__ = ["RWLock"]


class RWLock:
    """An asyncio readers-writer lock: many readers at once, or one writer; waiting writers go first.

    Hold it around awaited thread-pool work that cannot be abandoned (starlette's
    ``run_in_threadpool``): a cancelled request then still waits for its thread before releasing.
    """

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def read(self):
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def write(self):
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and not self._readers)
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            async with self._cond:
                self._writer = False
                self._cond.notify_all()
