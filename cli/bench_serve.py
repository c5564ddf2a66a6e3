"""``nil bench serve``: throughput and latency of ``nil index serve``, closed loop and open loop, JSON and .npy."""

from __future__ import annotations

from pathlib import Path

import click

from cli.bench_commands import _invocation, bench


def _formats(ctx, param, value: str) -> tuple[str, ...]:
    from benchmarks.serve import FORMATS

    out = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    wrong = [v for v in out if v not in FORMATS]
    if wrong or not out:
        raise click.BadParameter(f"{value!r}: give one or more of {', '.join(FORMATS)}, comma-separated.")
    return out


def _rates(ctx, param, value: str | None) -> tuple[float, ...]:
    if not value:
        return ()
    try:
        out = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of requests per second.") from None
    if any(not r > 0 for r in out):
        raise click.BadParameter(f"{value!r}: every rate must be above 0.")
    return tuple(int(r) if r.is_integer() else r for r in sorted(set(out)))


@bench.command("serve")
# data and index
@click.option("--n", default=100_000, show_default=True, help="Stored vectors.")
@click.option("--dim", default=128, show_default=True, help="Embedding width d.")
@click.option("--classes", default=9, show_default=True, help="Number of classes.")
@click.option("--index", "kind", default="auto", show_default=True,
              help="Index kind; auto: the engine's CPU default.")
@click.option("--seed", default=0, show_default=True, help="Seed of the vectors and the queries.")
# load
@click.option("--format", "formats", default="json", show_default=True, callback=_formats,
              help="Body formats, comma-separated, measured side by side on the same server: json, npy (.npy "
                   "arrays in and out).")
@click.option("--requests", default=5000, show_default=True, type=click.IntRange(1),
              help="Closed loop: search requests in all, per format.")
@click.option("--clients", default=16, show_default=True, type=click.IntRange(1),
              help="Closed loop: concurrent clients.")
@click.option("--batch", default=32, show_default=True, type=click.IntRange(1), help="Query vectors per request.")
@click.option("--k", default=5, show_default=True, type=click.IntRange(1), help="Neighbours per query.")
@click.option("--warmup", default=64, show_default=True, type=click.IntRange(0),
              help="Untimed requests first, per format.")
@click.option("--max-seconds", default=600.0, show_default=True, help="Time budget of each closed-loop phase.")
@click.option("--rates", default=None, callback=_rates,
              help="Open loop: arrival rates in requests/s, comma-separated (e.g. 100,200,300,400,600); each "
                   "sends on a fixed schedule, latency from the time a request was due [default: no open loop].")
@click.option("--rate-seconds", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Open loop: seconds each rate sends for.")
@click.option("--connections", default=64, show_default=True, type=click.IntRange(1),
              help="Open loop: most connections at once (a request waits for a free one, and that time counts).")
@click.option("--request-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Open loop: seconds after which an unanswered request counts as an error.")
# server
@click.option("--search-threads", default=None, type=click.IntRange(1),
              help="The server's --search-threads [default: its own default].")
@click.option("--torch-threads", default=None, type=click.IntRange(1),
              help="The server's --torch-threads [default: its own default].")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1),
              help="The server's --workers (processes, each with a copy of the index).")
@click.option("--coalesce", default=None, type=click.IntRange(0),
              help="The server's --coalesce (0: every request searched alone) [default: its own default].")
@click.option("--loop", type=click.Choice(["auto", "asyncio", "uvloop"]), default="auto", show_default=True,
              help="The server's --loop.")
@click.option("--http", type=click.Choice(["auto", "h11", "httptools"]), default="auto", show_default=True,
              help="The server's --http.")
# output
@click.option("--out", default="benchmarks/results/serve.json", show_default=True, type=click.Path(),
              help="Result JSON; the .md table is written beside it.")
@click.pass_context
def bench_serve(ctx, n, dim, classes, kind, seed, formats, requests, clients, batch, k, warmup, max_seconds, rates,
                rate_seconds, connections, request_timeout, search_threads, torch_threads, workers, coalesce, loop, http,
                out):
    """Load a real `nil index serve` on loopback: throughput, p50/p95/p99, errors, closed and open loop.

    Builds a seeded index of N clustered vectors and serves it from its own process. From this
    one: a closed loop of concurrent clients (asyncio + httpx), then, with --rates, an open loop
    per rate (requests sent on a fixed schedule, latency from the time each was due), for each
    body format in turn; bounded in count and in time.
    """
    from benchmarks.serve import ServeBench, run_serve_bench

    cfg = ServeBench(n=n, dim=dim, classes=classes, kind=kind, seed=seed, formats=formats, requests=requests,
                     clients=clients, batch=batch, k=k, warmup=warmup, max_seconds=max_seconds, rates=rates,
                     rate_seconds=rate_seconds, connections=connections, request_timeout=request_timeout,
                     search_threads=search_threads, torch_threads=torch_threads, workers=workers, coalesce=coalesce,
                     loop=loop, http=http, out=out)
    run_serve_bench(cfg, command=_invocation(ctx))
    click.echo(Path(out).with_suffix(".md").read_text())
    click.echo(f"wrote {out} and {Path(out).with_suffix('.md')}")


def _choices(allowed_name: str):
    def parse(ctx, param, value: str) -> tuple[str, ...]:
        import benchmarks.alternatives as alt

        allowed = getattr(alt, allowed_name)
        out = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
        wrong = [v for v in out if v not in allowed]
        if wrong or not out:
            raise click.BadParameter(f"{value!r}: give one or more of {', '.join(allowed)}, comma-separated.")
        return out
    return parse


@bench.command("alternatives")
@click.option("--n", default=100_000, show_default=True, type=click.IntRange(1), help="Stored vectors.")
@click.option("--data", default="serve,clusters,class-pure", show_default=True, callback=_choices("DATA"),
              help="serve: the service benchmark's index and requests; clusters, class-pure: the stream "
                   "benchmark's sets, each query keeping its own label.")
@click.option("--methods", default=",".join(("nil", "exact-torch", "faiss-ivfflat-selector", "usearch-postfilter",
                                            "usearch-per-class", "hnswlib-filter")),
              show_default=True, callback=_choices("METHODS"),
              help="usearch-* and hnswlib-filter need `pip install 'nil[alternatives]'`.")
@click.option("--requests", default=200, show_default=True, type=click.IntRange(1), help="Timed requests per method.")
@click.option("--batch", default=32, show_default=True, type=click.IntRange(1), help="Queries per request.")
@click.option("--k", default=5, show_default=True, type=click.IntRange(1), help="Neighbours per query.")
@click.option("--oversample", default=256, show_default=True, type=click.IntRange(1),
              help="usearch-postfilter: neighbours fetched before the label filter.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1), help="Threads of every library.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default="benchmarks/results/alternatives.json", show_default=True, type=click.Path(),
              help="Result JSON; the .md is written beside it. Rows already in it are kept.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@click.pass_context
def bench_alternatives(ctx, n, data, methods, requests, batch, k, oversample, threads, seed, out, progress):
    """The service's query, "k nearest samples of another class", answered by what a user might pick
    instead of nil: faiss with an ID selector per label, usearch (post-filter or one index per
    class), hnswlib with its filter callback; beside nil's engine and exact search, in one process,
    on the same requests. Build time, search ms per request (p50, p99), recall@1 and recall@k.
    """
    from benchmarks.alternatives import LIBRARY, AltBench, run_alternatives

    missing = sorted({LIBRARY[m] for m in methods if LIBRARY[m] in ("usearch", "hnswlib")}
                     - {lib for lib in ("usearch", "hnswlib") if _importable(lib)})
    if missing:
        raise click.UsageError(f"{', '.join(missing)} not installed: pip install 'nil[alternatives]', or leave "
                               f"their methods out of --methods")
    if batch * requests > 10 * n:
        raise click.BadParameter(f"{batch * requests:,} queries against {n:,} stored vectors: lower --requests",
                                 param_hint="--requests")
    cfg = AltBench(n=n, data=data, methods=methods, requests=requests, batch=batch, k=k, oversample=oversample,
                   threads=threads, seed=seed, out=out, progress=progress)
    run_alternatives(cfg, command=_invocation(ctx))
    click.echo(Path(out).with_suffix(".md").read_text())
    click.echo(f"wrote {out} and {Path(out).with_suffix('.md')}")


def _importable(name: str) -> bool:
    from importlib.util import find_spec

    return find_spec(name) is not None
