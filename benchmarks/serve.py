"""Benchmark of the search service: closed- and open-loop load against a real ``nil index serve`` over loopback.

The bench builds an index of N seeded clustered unit vectors with the engine (the CPU default kind
unless told otherwise), saves it, starts ``python -m cli index serve`` on a free loopback port in
its own process, and measures it from this one, for each body format asked (``json``, and ``npy``:
``.npy`` arrays in and out, :mod:`faiss_index.npy_stream`), side by side on the same server:

* closed loop: C concurrent clients (asyncio tasks sharing one httpx connection pool of C
  connections), each sending its next search of B queries (k neighbours, with the bearer token)
  once the last is answered, until R requests are sent or the time budget is spent; each latency
  runs from sending a request to having read its whole answer;
* open loop (``rates``): for each rate, requests due on a fixed schedule for ``rate_seconds``,
  sent whether or not earlier ones were answered, latency from the time each was *due*
  (:mod:`benchmarks.open_loop`), so queueing shows up as latency.

Request bodies are encoded before timing (the clients measure the service, not json.dumps). A
sample of answers of every phase is checked against the same index searched in process. The
server's own per-request times (its log lines: method, path, status, ms) are summarised beside
the client-side figures, so time spent in the client and on the loopback can be told apart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import faiss_index
from benchmarks.measure import load_average
from benchmarks.open_loop import HttpRequest, OpenLoopRun, run_open_loop
from benchmarks.report import envelope, fmt, machine_lines, markdown_head, markdown_table, write_result
from benchmarks.server import ServeProcess
from faiss_index import npy_stream
from faiss_index.indexes.base import BaseIndex
from faiss_index.synthetic import clustered

LOG = logging.getLogger(__name__)

P99_GOAL_MS = 50.0  # p99 latency goal at 100k vectors, batch 32, k 5, on the 2-core machine
OPEN_LOOP_GOAL_RATE = 300.0  # ... held at this many requests/s, sent open loop (issue 15)
GOAL_BATCH = 32  # queries per request the goals speak of
FORMATS = ("json", "npy")
PARITY_ANSWERS = 32  # answers of each phase compared with the in-process search


@dataclass
class ServeBench:
    # data and index
    n: int = 100_000  # stored vectors
    dim: int = 128  # embedding width
    classes: int = 9  # classes of the clustered vectors
    kind: str = "auto"  # index kind; auto: the engine's CPU default
    seed: int = 0  # seeds the vectors and the queries
    # load
    formats: tuple[str, ...] = ("json",)  # body formats measured, one after another on the same server
    requests: int = 5000  # closed loop: search requests in all (per format)
    clients: int = 16  # closed loop: concurrent clients
    batch: int = 32  # query vectors per request
    k: int = 5  # neighbours per query
    warmup: int = 64  # untimed requests first (per format)
    max_seconds: float = 600.0  # time budget of each closed-loop phase: stop sending after it
    rates: tuple[float, ...] = ()  # open loop: arrival rates in requests/s, each run in turn; empty: none
    rate_seconds: float = 10.0  # open loop: how long each rate sends (rate x rate_seconds requests)
    connections: int = 64  # open loop: most connections at once; a request waits for a free one (timed)
    request_timeout: float = 10.0  # open loop: a request unanswered this long after it was sent is an error
    # server
    search_threads: int | None = None  # the server's --search-threads (None: its default, the cores)
    torch_threads: int | None = None  # the server's --torch-threads (None: its default, 1)
    workers: int = 1  # server worker processes (each holds a copy of the index; more than 1 is read-only)
    coalesce: int | None = None  # the server's --coalesce (None: its default)
    loop: str = "auto"  # the server's --loop (auto: uvloop when installed)
    http: str = "auto"  # the server's --http (auto: httptools when installed)
    # output
    out: str = "benchmarks/results/serve.json"


@dataclass
class BodyFormat:
    """One body format's requests: the path, the headers, the encoded bodies, and how to read ids back."""

    name: str
    path: str
    headers: dict[str, str]
    bodies: list[bytes]

    def ids(self, content: bytes) -> list[list[int]]:
        if self.name == "npy":
            return npy_stream.loads(content, npy_stream.ANSWER_ARRAYS)["ids"].tolist()
        return json.loads(content)["ids"]


def encode_bodies(name: str, xq: torch.Tensor, yq: np.ndarray, cfg: ServeBench) -> BodyFormat:
    """The search requests of (xq, yq) in batches of cfg.batch, as JSON or as .npy arrays."""
    chunks = [(xq[i:i + cfg.batch].numpy(), yq[i:i + cfg.batch]) for i in range(0, len(xq), cfg.batch)]
    if name == "npy":
        return BodyFormat(name, f"/v1/search?k={cfg.k}", {"Content-Type": npy_stream.MEDIA_TYPE,
                                                          "Accept": npy_stream.MEDIA_TYPE},
                          [npy_stream.dumps(x, y.astype(np.int64)) for x, y in chunks])
    if name != "json":
        raise ValueError(f"unknown body format {name!r}; choose from {', '.join(FORMATS)}.")
    return BodyFormat(name, "/v1/search", {"Content-Type": "application/json"},
                      [json.dumps({"vectors": x.tolist(), "labels": y.tolist(), "k": cfg.k}).encode() for x, y in chunks])


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def build_index(cfg: ServeBench, folder: Path) -> tuple[BaseIndex, torch.Tensor, dict]:
    """Build and save the benchmark's index; return it (for the parity check), its vectors and build facts."""
    kind = faiss_index.resolve_kind(cfg.kind, "cpu")
    t0 = time.perf_counter()
    x, y = clustered(cfg.n, cfg.dim, cfg.classes, seed=cfg.seed)
    index = faiss_index.make_index(kind, cfg.dim, cfg.classes)
    index.upsert(torch.arange(cfg.n), x, y)
    index.build()
    build_s = time.perf_counter() - t0
    faiss_index.save_index(index, folder, classes=[f"class{c}" for c in range(cfg.classes)],
                           keys=[f"sample/{i}" for i in range(cfg.n)], source=f"clustered(seed={cfg.seed})")
    return index, x, {"kind": kind, "params": index.params, "build_s": round(build_s, 2)}


def _server(folder: Path, log: Path, token: str, cfg: ServeBench) -> ServeProcess:
    args = ["--max-k", str(max(100, cfg.k)), "--max-batch", str(max(1024, cfg.batch))]
    if cfg.workers > 1:
        args += ["--workers", str(cfg.workers)]
    if cfg.torch_threads:
        args += ["--torch-threads", str(cfg.torch_threads)]
    if cfg.search_threads:
        args += ["--search-threads", str(cfg.search_threads)]
    if cfg.coalesce is not None:
        args += ["--coalesce", str(cfg.coalesce)]
    if cfg.loop != "auto":
        args += ["--loop", cfg.loop]
    if cfg.http != "auto":
        args += ["--http", cfg.http]
    return ServeProcess(folder, log, *args, token=token, env={"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY",
                                                                                               "PASSIVE")})


async def _load(url: str, token: str, body: BodyFormat, cfg: ServeBench, count: int, budget_s: float) -> dict:
    """count requests from cfg.clients concurrent tasks; latencies in ms, errors, answers of the first ones."""
    import httpx  # noqa: PLC0415

    limits = httpx.Limits(max_connections=cfg.clients, max_keepalive_connections=cfg.clients)
    headers = {"Authorization": f"Bearer {token}", **body.headers}
    latencies: list[float] = []
    errors: list[str] = []
    answers: dict[int, bytes] = {}
    next_i = 0
    deadline = time.perf_counter() + budget_s

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60, headers=headers) as client:
        async def worker():
            nonlocal next_i
            while next_i < count and time.perf_counter() < deadline:
                i = next_i
                next_i += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(body.path, content=body.bodies[i % len(body.bodies)])
                    content = r.content
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                ms = (time.perf_counter() - t0) * 1e3
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}: {content[:200]!r}")
                    continue
                latencies.append(ms)
                if i < PARITY_ANSWERS:
                    answers[i] = content

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(cfg.clients)))
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "errors": errors, "answers": answers, "wall_s": wall, "sent": next_i}


_LINE = re.compile(r"POST /v1/search (\d{3}) ([0-9.]+) ms")


def _server_ms(log: Path) -> list[float]:
    """Per-request times the server logged for /v1/search so far."""
    return [float(m.group(2)) for m in _LINE.finditer(log.read_text())]


def _server_ms_since(log: Path, mark: int, expected: int, wait_s: float = 2.0) -> list[float]:
    """The times logged after the first ``mark``, once ``expected`` more are there (a line is written just
    after its answer is sent, so the last ones may lag the client by a moment) or after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while len(ms := _server_ms(log)) < mark + expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return ms[mark:]


class _Phase:
    """CPU seconds of the server and of this process, and the server's log lines, over one phase."""

    def __init__(self, server: ServeProcess):
        self.server = server
        self.mark = len(_server_ms(server.log))
        self.cpu0 = _process_cpu_s(server.proc.pid), time.process_time()

    def finish(self, sent: int) -> dict:
        cpu1 = _process_cpu_s(self.server.proc.pid), time.process_time()
        server_ms = _server_ms_since(self.server.log, self.mark, sent)
        return {"server_p50_ms": _round(_percentile(server_ms, 50)), "server_p99_ms": _round(_percentile(server_ms, 99)),
                "server_cpu_ms_per_request": _per(cpu1[0], self.cpu0[0], sent),
                "client_cpu_ms_per_request": _per(cpu1[1], self.cpu0[1], sent)}


def _mismatches(answers: dict[int, bytes], body: BodyFormat, index: BaseIndex, xq: torch.Tensor, yq: np.ndarray,
                cfg: ServeBench) -> tuple[int, int]:
    """(answers checked, answers whose ids differ from the same index searched in process)."""
    n_bodies = len(body.bodies)
    checked = sorted(answers.items())[:PARITY_ANSWERS]
    wrong = 0
    for i, content in checked:
        sl = slice((i % n_bodies) * cfg.batch, (i % n_bodies + 1) * cfg.batch)
        wrong += body.ids(content) != index.search_other_class(xq[sl], torch.as_tensor(yq[sl]), cfg.k).ids.tolist()
    return len(checked), wrong


def _closed_row(name: str, run: dict, cfg: ServeBench) -> dict:
    lat = run["latencies"]
    return {
        "format": name, "requests": len(lat) + len(run["errors"]), "requests_planned": cfg.requests,
        "errors": len(run["errors"]), "error_samples": run["errors"][:5], "wall_s": round(run["wall_s"], 2),
        "throughput_rps": round(len(lat) / run["wall_s"], 1) if run["wall_s"] else None,
        "queries_per_s": round(len(lat) * cfg.batch / run["wall_s"], 1) if run["wall_s"] else None,
        "p50_ms": _round(_percentile(lat, 50)), "p95_ms": _round(_percentile(lat, 95)),
        "p99_ms": _round(_percentile(lat, 99)), "max_ms": _round(max(lat) if lat else None),
        "time_budget_hit": run["sent"] < cfg.requests,
    }


def _open_row(name: str, run: OpenLoopRun) -> dict:
    lat = run.latencies_ms
    return {
        "format": name, "rate": run.rate, "requests": run.scheduled, "errors": len(run.errors),
        "error_samples": run.errors[:3],
        "throughput": round(len(lat) / run.wall_s, 1) if run.wall_s > 0 else None,
        "p50_ms": _round(_percentile(lat, 50)), "p99_ms": _round(_percentile(lat, 99)),
        "max_ms": _round(max(lat) if lat else None),
        "send_lag_p99_ms": _round(_percentile(run.send_lag_ms, 99)),
    }


def open_loop_verdict(rows: list[dict], batch: int) -> tuple[dict, dict]:
    """({format: highest rate with no errors and p99 under the goal, or None}, the open-loop goal and
    whether these rows meet it: p99 < 50 ms with no errors at >= 300 requests/s of >= 32 queries)."""
    def meets(row: dict) -> bool:
        return row["errors"] == 0 and row["p99_ms"] is not None and row["p99_ms"] < P99_GOAL_MS

    formats = dict.fromkeys(r["format"] for r in rows)
    best = {name: max((r["rate"] for r in rows if r["format"] == name and meets(r)), default=None) for name in formats}
    goal = {"p99_ms": P99_GOAL_MS, "rate": OPEN_LOOP_GOAL_RATE, "batch": GOAL_BATCH, "errors": 0,
            "measured": batch >= GOAL_BATCH and any(r["rate"] >= OPEN_LOOP_GOAL_RATE for r in rows),
            "met": batch >= GOAL_BATCH and any(r is not None and r >= OPEN_LOOP_GOAL_RATE for r in best.values())}
    return best, goal


def run_serve_bench(cfg: ServeBench, command: str | None = None) -> dict:
    """Run the benchmark and write cfg.out (JSON) and the .md beside it; return the result."""
    result = envelope(command or " ".join(shlex.quote(a) for a in sys.argv), benchmark="serve", settings=asdict(cfg))
    token = secrets.token_urlsafe(16)
    rng = np.random.default_rng(cfg.seed + 1)
    closed, opened = [], []
    parity = [0, 0]
    with tempfile.TemporaryDirectory(prefix="nil-bench-serve-") as tmp:
        folder = Path(tmp) / "index"
        index, x, built = build_index(cfg, folder)
        result["index"] = {"n": cfg.n, "dim": cfg.dim, "classes": cfg.classes, **built}
        # queries: perturbed stored vectors (new patches near the training set), labels at random
        rows = torch.as_tensor(rng.integers(0, cfg.n, size=256 * cfg.batch))
        xq = x[rows] + 0.05 * torch.as_tensor(rng.normal(size=(len(rows), cfg.dim)), dtype=torch.float32) / cfg.dim ** 0.5
        xq = xq / xq.norm(dim=1, keepdim=True)
        yq = rng.integers(0, cfg.classes, size=len(xq))
        del x
        bodies = [encode_bodies(name, xq, yq, cfg) for name in cfg.formats]
        log = Path(tmp) / "server.log"
        server = _server(folder, log, token, cfg)
        result["server_command"] = server.command.replace(tmp, "$TMP")
        try:
            t0 = time.perf_counter()
            server.wait_ready()
            result["server_start_s"] = round(time.perf_counter() - t0, 2)
            for body in bodies:
                asyncio.run(_load(server.url, token, body, cfg, cfg.warmup, cfg.max_seconds))
                if "load_avg_mid" not in result:
                    result["load_avg_mid"] = load_average()
                phase = _Phase(server)
                run = asyncio.run(_load(server.url, token, body, cfg, cfg.requests, cfg.max_seconds))
                closed.append(_closed_row(body.name, run, cfg) | phase.finish(run["sent"]))
                parity = [a + b for a, b in zip(parity, _mismatches(run["answers"], body, index, xq, yq, cfg))]
                wires = [HttpRequest.post(server.url, body.path, b, {"Authorization": f"Bearer {token}",
                                                                      **body.headers}) for b in body.bodies]
                for rate in cfg.rates:
                    phase = _Phase(server)
                    count = max(1, round(rate * cfg.rate_seconds))
                    orun = run_open_loop(server.url, wires, rate, count, connections=cfg.connections,
                                         timeout_s=cfg.request_timeout, keep_answers=PARITY_ANSWERS)
                    opened.append(_open_row(body.name, orun) | phase.finish(count))
                    parity = [a + b for a, b in zip(parity, _mismatches(orun.answers, body, index, xq, yq, cfg))]
                    time.sleep(min(2.0, cfg.request_timeout))  # what a rate left queued drains before the next
        finally:
            server.stop()
        startup = [line for line in log.read_text().splitlines() if "serving " in line]
    result["load_avg_end"] = load_average()
    result["server_startup_line"] = startup[0].split(" INFO ", 1)[-1].replace(tmp, "$TMP") if startup else None

    # the first format's closed loop keeps the top-level keys of earlier results
    result.update({key: value for key, value in closed[0].items() if key != "format"})
    result.update({"closed_loop": closed, "open_loop": opened,
                   "parity_checked": parity[0], "parity_mismatches": parity[1]})
    result["goal"] = {"p99_ms": P99_GOAL_MS, "errors": 0,
                      "met": bool(result["errors"] == 0 and result["p99_ms"] is not None
                                  and result["p99_ms"] < P99_GOAL_MS and not result["time_budget_hit"])}
    result["open_loop_best"], result["open_loop_goal"] = open_loop_verdict(opened, cfg.batch)
    write_result(cfg.out, result, serve_markdown(result))
    return result


def _process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds a process and its live children have used so far (Linux), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += _process_cpu_s(int(child)) or 0.0
        return total
    except (OSError, IndexError, ValueError):
        return None


def _per(end: float | None, start: float | None, n: int) -> float | None:
    return None if end is None or start is None or not n else round((end - start) / n * 1e3, 2)


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def _open_loop_lines(result: dict) -> list[str]:
    s, goal = result["settings"], result["open_loop_goal"]
    rows = result["open_loop"]
    if not rows:
        return ["", "Open loop: not run (give `--rates`, e.g. `--rates 100,200,300,400,600`)."]
    out = ["", (f"**Open loop**: requests due on a fixed schedule at each rate for {s['rate_seconds']} s, sent "
                f"whether or not earlier ones were answered (lean asyncio HTTP/1.1 client, at most "
                f"{s['connections']} connections); latency runs from the time a request was due, so a queue shows "
                f"up as latency. Send lag: how late the client itself sent (a slow client, not the server)."), ""]
    out.append(markdown_table(
        ["format", "rate (req/s)", "requests", "errors", "throughput (req/s)", "p50 ms", "p99 ms", "max ms",
         "send lag p99 ms", "server p99 ms", "server CPU ms/req", "client CPU ms/req"],
        [[r["format"], fmt(r["rate"]), fmt(r["requests"]), fmt(r["errors"]), fmt(r["throughput"]),
          fmt(r["p50_ms"]), fmt(r["p99_ms"]), fmt(r["max_ms"]), fmt(r["send_lag_p99_ms"]), fmt(r["server_p99_ms"]),
          fmt(r["server_cpu_ms_per_request"]), fmt(r["client_cpu_ms_per_request"])] for r in rows]))
    best = ", ".join(f"{name} {fmt(rate) + ' requests/s' if rate is not None else 'none of the rates'}"
                     for name, rate in result["open_loop_best"].items())
    if goal["met"]:
        verdict = "**met**"
    elif not goal["measured"]:
        verdict = (f"**not measured** (it needs --batch >= {goal['batch']} and a rate of at least "
                   f"{goal['rate']:.0f}/s)")
    else:
        verdict = "**not met**"
    out += ["", f"Highest rate with p99 under {goal['p99_ms']:.0f} ms and no errors: {best}.",
            (f"Goal: p99 < {goal['p99_ms']:.0f} ms at >= {goal['rate']:.0f} requests/s of {goal['batch']} queries "
             f"-> {verdict}.")]
    errors = [f"{r['format']} at {fmt(r['rate'])}/s: {r['error_samples'][0]}" for r in rows if r["error_samples"]]
    if errors:
        out += ["", "Open-loop errors (first of each rate): " + "; ".join(errors)]
    return out


def serve_markdown(result: dict) -> str:
    s, ix = result["settings"], result["index"]
    goal = result["goal"]
    verdict = "**met**" if goal["met"] else "**not met**"
    first = result["closed_loop"][0]
    out = markdown_head("Search service: closed- and open-loop load over loopback", result) + machine_lines(result)
    out += [f"- load average mid-run: {result.get('load_avg_mid')}",
            f"- server: `{result['server_command']}` (started in {result.get('server_start_s')} s); "
            f"{result.get('server_startup_line')}", "",
            f"Index: {ix['n']:,} clustered unit vectors, {ix['dim']}-d, {ix['classes']} classes, kind `{ix['kind']}` "
            f"(built in {ix['build_s']} s). Requests: `POST /v1/search` of {s['batch']} queries, k = {s['k']}, "
            f"bodies encoded before timing; formats: "
            + ", ".join(f"`{name}`" for name in s["formats"]) + " (json: JSON both ways; npy: .npy arrays both "
            f"ways), each after {s['warmup']} warm-up requests.", "",
            f"**Closed loop**: {s['clients']} concurrent clients in one process (asyncio, httpx), "
            f"{result['requests_planned']:,} requests per format.", ""]
    out.append(markdown_table(
        ["format", "requests", "errors", "throughput (req/s)", "queries/s", "p50 ms", "p95 ms", "p99 ms", "max ms",
         "server p50 ms", "server p99 ms", "server CPU ms/req", "client CPU ms/req"],
        [[r["format"], fmt(r["requests"]), fmt(r["errors"]), fmt(r["throughput_rps"]), fmt(r["queries_per_s"]),
          fmt(r["p50_ms"]), fmt(r["p95_ms"]), fmt(r["p99_ms"]), fmt(r["max_ms"]), fmt(r["server_p50_ms"]),
          fmt(r["server_p99_ms"]), fmt(r["server_cpu_ms_per_request"]), fmt(r["client_cpu_ms_per_request"])]
         for r in result["closed_loop"]]))
    out += ["", f"Closed-loop goal ({first['format']}): zero errors and p99 under {goal['p99_ms']:.0f} ms -> {verdict} "
                f"({result['errors']} errors, p99 {fmt(result['p99_ms'])} ms"
                + (", the time budget ended the run early" if result["time_budget_hit"] else "") + ").",
            f"Each of the {s['clients']} clients waits for its answer before sending again, so a request queues "
            f"behind the others' and clients / throughput = "
            f"{fmt(s['clients'] / result['throughput_rps'] * 1e3 if result['throughput_rps'] else None)} ms, "
            f"close to p50: the service's throughput sets the latency (the CPU per request over the cores "
            f"left by other jobs), not the time of one search."]
    out += _open_loop_lines(result)
    out += ["", f"Parity: {result['parity_checked']} answers (of every phase) compared with the same index searched "
                f"in process, {result['parity_mismatches']} differed.",
            "Server ms are the service's own log times (request received to response sent); the rest of a "
            "client's latency is the client, the loopback and waiting for a core (both processes share the "
            "machine's cores)."]
    samples = [e for r in result["closed_loop"] for e in r["error_samples"]]
    if samples:
        out += ["", "Errors (first ones): " + "; ".join(samples[:5])]
    return "\n".join(out) + "\n"
