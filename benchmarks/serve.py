"""Benchmark of the search service: concurrent clients against a real ``nil index serve`` over loopback.

The bench builds an index of N seeded clustered unit vectors with the engine (the CPU default kind
unless told otherwise), saves it, starts ``python -m cli index serve`` on a free loopback port in
its own process, and from this one process runs C concurrent clients (asyncio tasks sharing one
httpx connection pool of C connections) that send R search requests of B queries each, k
neighbours, with the bearer token, until all are sent or the time budget is spent. Request bodies
are encoded before timing (the clients measure the service, not json.dumps); each latency runs
from sending a request to having read its whole answer. A sample of answers is checked against
the same index searched in process.

The server's own per-request times (its log lines: method, path, status, ms) are summarised beside
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
from benchmarks.report import envelope, fmt, machine_lines, markdown_head, markdown_table, write_result
from benchmarks.server import ServeProcess
from faiss_index.indexes.base import BaseIndex
from faiss_index.synthetic import clustered

LOG = logging.getLogger(__name__)

P99_GOAL_MS = 50.0  # p99 latency goal at 100k vectors, 16 clients, batch 32, k 5, on the 2-core machine


@dataclass
class ServeBench:
    # data and index
    n: int = 100_000  # stored vectors
    dim: int = 128  # embedding width
    classes: int = 9  # classes of the clustered vectors
    kind: str = "auto"  # index kind; auto: the engine's CPU default
    seed: int = 0  # seeds the vectors and the queries
    # load
    requests: int = 5000  # search requests in all
    clients: int = 16  # concurrent clients
    batch: int = 32  # query vectors per request
    k: int = 5  # neighbours per query
    warmup: int = 64  # untimed requests first
    max_seconds: float = 600.0  # time budget of the timed phase: stop sending after it
    # server
    search_threads: int | None = None  # the server's --search-threads (None: its default, the cores)
    torch_threads: int | None = None  # the server's --torch-threads (None: its default, 1)
    workers: int = 1  # server worker processes (each holds a copy of the index; more than 1 is read-only)
    # output
    out: str = "benchmarks/results/serve.json"


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
    return ServeProcess(folder, log, *args, token=token, env={"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY",
                                                                                               "PASSIVE")})


async def _load(url: str, token: str, bodies: list[bytes], cfg: ServeBench, count: int,
                budget_s: float) -> dict:
    """count requests from cfg.clients concurrent tasks; latencies in ms, errors, answers of the first ones."""
    import httpx  # noqa: PLC0415

    limits = httpx.Limits(max_connections=cfg.clients, max_keepalive_connections=cfg.clients)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
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
                body = bodies[i % len(bodies)]
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/search", content=body)
                    content = r.content
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                ms = (time.perf_counter() - t0) * 1e3
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}: {content[:200]!r}")
                    continue
                latencies.append(ms)
                if i < len(bodies):
                    answers[i] = content

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(cfg.clients)))
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "errors": errors, "answers": answers, "wall_s": wall, "sent": next_i}


_LINE = re.compile(r"POST /v1/search (\d{3}) ([0-9.]+) ms")


def _server_ms(log: Path, skip: int) -> list[float]:
    """Per-request times the server logged for /v1/search, after the first ``skip`` (the warm-up)."""
    return [float(m.group(2)) for m in _LINE.finditer(log.read_text())][skip:]


def run_serve_bench(cfg: ServeBench, command: str | None = None) -> dict:
    """Run the benchmark and write cfg.out (JSON) and the .md beside it; return the result."""
    result = envelope(command or " ".join(shlex.quote(a) for a in sys.argv), benchmark="serve", settings=asdict(cfg))
    token = secrets.token_urlsafe(16)
    rng = np.random.default_rng(cfg.seed + 1)
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
        bodies = [json.dumps({"vectors": xq[i:i + cfg.batch].tolist(), "labels": yq[i:i + cfg.batch].tolist(),
                              "k": cfg.k}).encode() for i in range(0, len(xq), cfg.batch)]
        log = Path(tmp) / "server.log"
        server = _server(folder, log, token, cfg)
        result["server_command"] = server.command.replace(tmp, "$TMP")
        try:
            t0 = time.perf_counter()
            server.wait_ready()
            result["server_start_s"] = round(time.perf_counter() - t0, 2)
            asyncio.run(_load(server.url, token, bodies, cfg, cfg.warmup, cfg.max_seconds))
            load_mid = load_average()
            cpu0 = _process_cpu_s(server.proc.pid), time.process_time()
            run = asyncio.run(_load(server.url, token, bodies, cfg, cfg.requests, cfg.max_seconds))
            cpu1 = _process_cpu_s(server.proc.pid), time.process_time()
        finally:
            server.stop()
        startup = [line for line in log.read_text().splitlines() if "serving " in line]
        server_ms = _server_ms(log, cfg.warmup)
    result["load_avg_mid"] = load_mid
    result["load_avg_end"] = load_average()
    result["server_startup_line"] = startup[0].split(" INFO ", 1)[-1].replace(tmp, "$TMP") if startup else None

    # parity: the first answers equal the same index searched in process
    mismatches = 0
    for i, content in sorted(run["answers"].items())[:32]:
        got = json.loads(content)["ids"]
        sl = slice(i * cfg.batch, (i + 1) * cfg.batch)
        ref = index.search_other_class(xq[sl], torch.as_tensor(yq[sl]), cfg.k).ids.tolist()
        mismatches += got != ref
    lat = run["latencies"]
    result.update({
        "requests": len(lat) + len(run["errors"]),
        "requests_planned": cfg.requests,
        "errors": len(run["errors"]),
        "error_samples": run["errors"][:5],
        "wall_s": round(run["wall_s"], 2),
        "throughput_rps": round(len(lat) / run["wall_s"], 1) if run["wall_s"] else None,
        "queries_per_s": round(len(lat) * cfg.batch / run["wall_s"], 1) if run["wall_s"] else None,
        "p50_ms": _round(_percentile(lat, 50)), "p95_ms": _round(_percentile(lat, 95)),
        "p99_ms": _round(_percentile(lat, 99)), "max_ms": _round(max(lat) if lat else None),
        "server_p50_ms": _round(_percentile(server_ms, 50)), "server_p99_ms": _round(_percentile(server_ms, 99)),
        "server_cpu_ms_per_request": _per(cpu1[0], cpu0[0], run["sent"]),
        "client_cpu_ms_per_request": _per(cpu1[1], cpu0[1], run["sent"]),
        "parity_checked": min(32, len(run["answers"])), "parity_mismatches": mismatches,
        "time_budget_hit": run["sent"] < cfg.requests,
    })
    result["goal"] = {"p99_ms": P99_GOAL_MS, "errors": 0,
                      "met": bool(result["errors"] == 0 and result["p99_ms"] is not None
                                  and result["p99_ms"] < P99_GOAL_MS and not result["time_budget_hit"])}
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


def serve_markdown(result: dict) -> str:
    s, ix = result["settings"], result["index"]
    goal = result["goal"]
    verdict = "**met**" if goal["met"] else "**not met**"
    out = markdown_head("Search service: concurrent clients over loopback", result) + machine_lines(result)
    out += [f"- load average mid-run: {result.get('load_avg_mid')}",
            f"- server: `{result['server_command']}` (started in {result.get('server_start_s')} s); "
            f"{result.get('server_startup_line')}", "",
            f"Index: {ix['n']:,} clustered unit vectors, {ix['dim']}-d, {ix['classes']} classes, kind `{ix['kind']}` "
            f"(built in {ix['build_s']} s). Load: {s['clients']} concurrent clients in one process (asyncio, "
            f"httpx), {result['requests_planned']:,} `POST /v1/search` requests of {s['batch']} queries, k = "
            f"{s['k']}, after {s['warmup']} warm-up requests; bodies encoded before timing.", ""]
    out.append(markdown_table(
        ["requests", "errors", "throughput (req/s)", "queries/s", "p50 ms", "p95 ms", "p99 ms", "max ms",
         "server p50 ms", "server p99 ms"],
        [[fmt(result["requests"]), fmt(result["errors"]), fmt(result["throughput_rps"]), fmt(result["queries_per_s"]),
          fmt(result["p50_ms"]), fmt(result["p95_ms"]), fmt(result["p99_ms"]), fmt(result["max_ms"]),
          fmt(result["server_p50_ms"]), fmt(result["server_p99_ms"])]]))
    out += ["", f"Goal: zero errors and p99 under {goal['p99_ms']:.0f} ms -> {verdict} "
                f"({result['errors']} errors, p99 {fmt(result['p99_ms'])} ms"
                + (", the time budget ended the run early" if result["time_budget_hit"] else "") + ").",
            f"Closed loop: each of the {s['clients']} clients waits for its answer before sending again, so a "
            f"request queues behind the others' and clients / throughput = "
            f"{fmt(s['clients'] / result['throughput_rps'] * 1e3 if result['throughput_rps'] else None)} ms, "
            f"close to p50: the service's throughput sets the latency (the CPU per request below over the cores "
            f"left by other jobs), not the time of one search.",
            f"Parity: {result['parity_checked']} answers compared with the same index searched in process, "
            f"{result['parity_mismatches']} differed.",
            f"CPU per request: server {fmt(result.get('server_cpu_ms_per_request'))} ms, clients "
            f"{fmt(result.get('client_cpu_ms_per_request'))} ms (two cores in all, shared with other jobs).",
            "Server ms are the service's own log times (request received to response sent); the rest of a "
            "client's latency is the client, the loopback and waiting for a core (both processes share the "
            "machine's cores)."]
    if result["error_samples"]:
        out += ["", "Errors (first ones): " + "; ".join(result["error_samples"])]
    return "\n".join(out) + "\n"
