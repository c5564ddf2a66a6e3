"""Open-loop load: requests sent on a fixed schedule whatever the answers, over lean keep-alive HTTP/1.1.

At rate r the i-th request is due at ``t0 + i / r``. It is sent then, on an idle connection or a
new one (up to ``connections``; beyond that it waits for one to free up), and its latency runs
from the time it was *due* to the time its whole answer was read. A server that falls behind
therefore shows its queue as latency instead of slowing the senders down (the closed loop's
"coordinated omission"), and a sender that falls behind is charged too; how late the sends left
is recorded beside it (``send_lag``), so a slow client can be told from a slow server.

The client is asyncio streams with hand-written HTTP/1.1 requests, not httpx: httpx spends about
2 ms of CPU per request, which at 300 requests/s is 60% of a core taken from the server on the
same 2-core machine; this one spends a few tenths of a millisecond. It understands exactly what
the service sends back: a status line, headers with a Content-Length, and the body.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from urllib.parse import urlsplit

LOG = logging.getLogger(__name__)

__all__ = ["HttpRequest", "OpenLoopRun", "run_open_loop"]


@dataclass(frozen=True)
class HttpRequest:
    """One request's bytes on the wire, encoded before any timing."""

    wire: bytes

    @classmethod
    def post(cls, url: str, path: str, body: bytes, headers: dict[str, str]) -> HttpRequest:
        host = urlsplit(url).netloc
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}",
                 *(f"{k}: {v}" for k, v in headers.items())]
        return cls(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


@dataclass
class OpenLoopRun:
    """What one rate produced: latencies and send lags in ms (answered requests), errors, answers by index."""

    rate: float
    scheduled: int
    latencies_ms: list[float] = field(default_factory=list)
    send_lag_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    answers: dict[int, bytes] = field(default_factory=dict)
    wall_s: float = 0.0  # first due time to last answer


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def exchange(self, wire: bytes) -> tuple[int, bytes, bool]:
        """Send one request, read its answer: (status, body, whether the connection stays usable)."""
        self.writer.write(wire)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, keep = None, True
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                keep = False
            elif name == "transfer-encoding":
                raise ValueError(f"unexpected Transfer-Encoding {value.strip()!r} (this client reads Content-Length)")
        if length is None:
            raise ValueError("an answer without Content-Length")
        return status, await self.reader.readexactly(length), keep

    def close(self) -> None:
        self.writer.close()


class _Pool:
    """At most ``size`` keep-alive connections to host:port; a request waits for a free one."""

    def __init__(self, host: str, port: int, size: int):
        self.host, self.port = host, port
        self.slots = asyncio.Semaphore(size)
        self.idle: list[_Connection] = []

    async def acquire(self, fresh: bool = False) -> tuple[_Connection, bool]:
        """A connection and whether it was reused (fresh: never reuse)."""
        await self.slots.acquire()
        if self.idle and not fresh:
            return self.idle.pop(), True
        try:
            return _Connection(*await asyncio.open_connection(self.host, self.port)), False
        except BaseException:
            self.slots.release()
            raise

    def release(self, conn: _Connection, reusable: bool) -> None:
        if reusable:
            self.idle.append(conn)
        else:
            conn.close()
        self.slots.release()

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


async def _exchange(pool: _Pool, wire: bytes) -> tuple[int, bytes]:
    # A keep-alive connection the server closed while it sat idle (uvicorn closes them after 5 s)
    # fails before any byte of an answer: like any HTTP client, send again once on a new connection.
    for fresh in (False, True):
        conn, reused = await pool.acquire(fresh)
        reusable = False
        try:
            status, body, reusable = await conn.exchange(wire)
            return status, body
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as exc:
            partial = getattr(exc, "partial", b"")
            if not reused or partial:
                raise
        finally:  # an error or a timeout leaves the connection in an unknown state: it is closed
            pool.release(conn, reusable)
    raise AssertionError("unreachable")


async def _run(url: str, requests: list[HttpRequest], rate: float, count: int, connections: int,
               timeout_s: float, keep_answers: int) -> OpenLoopRun:
    parts = urlsplit(url)
    pool = _Pool(parts.hostname, parts.port, connections)
    run = OpenLoopRun(rate=rate, scheduled=count)
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    last_done = t0

    async def one(i: int, due: float) -> None:
        nonlocal last_done
        run.send_lag_ms.append((loop.time() - due) * 1e3)
        try:
            status, body = await asyncio.wait_for(_exchange(pool, requests[i % len(requests)].wire), timeout_s)
        except asyncio.TimeoutError:
            run.errors.append(f"no answer within {timeout_s:g} s")
            return
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            run.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            return
        done = loop.time()
        if status != 200:
            run.errors.append(f"HTTP {status}: {body[:200]!r}")
            return
        last_done = max(last_done, done)
        run.latencies_ms.append((done - due) * 1e3)
        if i < keep_answers:
            run.answers[i] = body

    tasks = []
    for i in range(count):
        due = t0 + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))  # not awaited here: the schedule never waits
    await asyncio.gather(*tasks)
    pool.close()
    run.wall_s = last_done - t0
    return run


def run_open_loop(url: str, requests: list[HttpRequest], rate: float, count: int, *, connections: int = 64,
                  timeout_s: float = 10.0, keep_answers: int = 0) -> OpenLoopRun:
    """Send ``count`` requests (cycling through ``requests``) at ``rate`` per second to ``url``.

    A request unanswered ``timeout_s`` after it was sent is an error; the first ``keep_answers``
    answers are kept (for a parity check). Blocks until every request is answered or has failed.
    """
    return asyncio.run(_run(url, requests, rate, count, connections, timeout_s, keep_answers))
