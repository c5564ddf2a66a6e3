"""``nil bench serve``: throughput and latency of ``nil index serve`` under concurrent clients."""

from __future__ import annotations

from pathlib import Path

import click

from cli.bench_commands import _invocation, bench


@bench.command("serve")
# data and index
@click.option("--n", default=100_000, show_default=True, help="Stored vectors.")
@click.option("--dim", default=128, show_default=True, help="Embedding width d.")
@click.option("--classes", default=9, show_default=True, help="Number of classes.")
@click.option("--index", "kind", default="auto", show_default=True,
              help="Index kind; auto: the engine's CPU default.")
@click.option("--seed", default=0, show_default=True, help="Seed of the vectors and the queries.")
# load
@click.option("--requests", default=5000, show_default=True, type=click.IntRange(1), help="Search requests in all.")
@click.option("--clients", default=16, show_default=True, type=click.IntRange(1), help="Concurrent clients.")
@click.option("--batch", default=32, show_default=True, type=click.IntRange(1), help="Query vectors per request.")
@click.option("--k", default=5, show_default=True, type=click.IntRange(1), help="Neighbours per query.")
@click.option("--warmup", default=64, show_default=True, type=click.IntRange(0), help="Untimed requests first.")
@click.option("--max-seconds", default=600.0, show_default=True, help="Time budget of the timed requests.")
# server
@click.option("--search-threads", default=None, type=click.IntRange(1),
              help="The server's --search-threads [default: its own default].")
@click.option("--torch-threads", default=None, type=click.IntRange(1),
              help="The server's --torch-threads [default: its own default].")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1),
              help="The server's --workers (processes, each with a copy of the index).")
# output
@click.option("--out", default="benchmarks/results/serve.json", show_default=True, type=click.Path(),
              help="Result JSON; the .md table is written beside it.")
@click.pass_context
def bench_serve(ctx, n, dim, classes, kind, seed, requests, clients, batch, k, warmup, max_seconds, search_threads,
                torch_threads, workers, out):
    """Concurrent clients against a real `nil index serve` on loopback: throughput, p50/p95/p99, errors.

    Builds a seeded index of N clustered vectors, serves it from its own process, and sends the
    search requests from this one (asyncio + httpx), bounded in count and in time.
    """
    from benchmarks.serve import ServeBench, run_serve_bench

    cfg = ServeBench(n=n, dim=dim, classes=classes, kind=kind, seed=seed, requests=requests, clients=clients,
                     batch=batch, k=k, warmup=warmup, max_seconds=max_seconds, search_threads=search_threads,
                     torch_threads=torch_threads, workers=workers, out=out)
    run_serve_bench(cfg, command=_invocation(ctx))
    click.echo(Path(out).with_suffix(".md").read_text())
    click.echo(f"wrote {out} and {Path(out).with_suffix('.md')}")
