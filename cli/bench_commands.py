"""``nil bench``: the mining and training-step benchmarks (the installed ``benchmarks`` package), written under benchmarks/results/."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from cli.options import INDEX_PARAM


def _ints(name: str):
    def parse(ctx, param, value: str) -> tuple[int, ...]:
        try:
            out = tuple(int(float(v)) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of integers", param_hint=name) from None
        if not out:
            raise click.BadParameter("give at least one value", param_hint=name)
        return out

    return parse


def _words(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


@click.group()
def bench():
    """Benchmarks: distractor-mining speed and recall, and its share of a training step.

    Each writes a JSON file recording the command and the machine, a markdown table beside it
    (with the goals the figures are held against, met or not), and for mining a plot.
    """


@bench.command("mining")
# data
@click.option("--n", "ns", default="10000,100000,1000000", show_default=True, callback=_ints("--n"),
              help="Memory sizes N (stored vectors), comma-separated.")
@click.option("--dim", default=128, show_default=True, help="Embedding width d.")
@click.option("--classes", default=9, show_default=True, help="Number of classes.")
@click.option("--seed", default=0, show_default=True, help="Seed of the vectors and the query batches.")
# search
@click.option("--batch", default=256, show_default=True, help="Queries per batch.")
@click.option("--batches", default=10, show_default=True, help="Timed batches per row (after the warm-up).")
@click.option("--warmup", default=2, show_default=True, help="Untimed batches first.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--methods", default=None,
              help="Only these methods, comma-separated (exact-torch, exact-faiss-flat, ivf, ivfpq, hnsw, "
                   "cagra, pml-xbm-batchhard) [default: all the engine offers].")
@click.option("--sweep/--no-sweep", default=True, show_default=True,
              help="Also run each approximate kind at 0.5x, 2x and 4x its default nprobe / efSearch.")
@click.option("--large", is_flag=True, help="Add N = 10,000,000 for the compressed approximate kinds.")
@click.option("--row-budget-s", default=300.0, show_default=True,
              help="Skip a row whose time, extrapolated linearly from the previous N, exceeds this.")
# output
@click.option("--out", default="benchmarks/results/mining.json", show_default=True, type=click.Path(),
              help="Result JSON; the .md table and .png plot are written beside it.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@click.pass_context
def bench_mining(ctx, ns, dim, classes, seed, batch, batches, warmup, device, methods, sweep, large, row_budget_s,
                 out, progress):
    """Nearest other-class search: recall@1 and ms per batch of every method at every N.

    Exact torch and FAISS flat search, each approximate FAISS kind the engine offers on the device
    (default parameters plus a small sweep), and the usual peer, pytorch-metric-learning's
    CrossBatchMemory with BatchHardMiner, all on the same seeded clustered vectors and query batches.
    """
    from benchmarks.mining import MiningBench, run_mining_bench
    from benchmarks.report import mining_markdown

    cfg = MiningBench(ns=ns, dim=dim, classes=classes, seed=seed, batch=batch, batches=batches, warmup=warmup,
                      device=device, methods=_words(methods), sweep=sweep, large=large, row_budget_s=row_budget_s,
                      out=out, progress=progress)
    result = run_mining_bench(cfg, command=_invocation(ctx))
    click.echo(mining_markdown(result))
    click.echo(f"wrote {out}, {Path(out).with_suffix('.md')} and {Path(out).with_suffix('.png')}")


@bench.command("stream")
@click.option("--n", "ns", default="1000000", show_default=True, callback=_ints("--n"),
              help="Memory sizes N (stored vectors), comma-separated.")
@click.option("--data", default="clusters,class-pure", show_default=True,
              help="Data kinds, comma-separated: clusters, class-pure, trained:INDEX_DIR (embeddings of "
                   "`nil index build`).")
@click.option("--kind", default="auto", show_default=True, help="Index kind; auto: the engine's default.")
@click.option("--param", "params", multiple=True, type=INDEX_PARAM,
              help="Index parameter (nprobe, rerank, nlist, store_dtype, ...); repeatable.")
@click.option("--refresh-every", default=200, show_default=True, help="Steps between rebuilds of the structure.")
@click.option("--cycles", default=2.0, show_default=True, help="Refresh cycles streamed.")
@click.option("--exact-every", default=2, show_default=True, help="Steps between exact searches (recall, exact ms).")
@click.option("--batch", default=256, show_default=True, help="Queries (and upserted samples) per step.")
@click.option("--classes", default=9, show_default=True, help="Classes of the synthetic data.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default="benchmarks/results/stream.json", show_default=True, type=click.Path(),
              help="Result JSON; the .md table and .png plot are written beside it. Rows already in it are kept.")
@click.option("--rerun", is_flag=True,
              help="Measure rows already in --out again (after a code change), replacing them; other rows stay.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@click.pass_context
def bench_stream(ctx, ns, data, kind, params, refresh_every, cycles, exact_every, batch, classes, seed, out, rerun,
                 progress):
    """The engine as training uses it: search then upsert moved vectors, step after step, over refresh cycles.

    Records per step the time (p50 and max, refresh included) and recall@1 against exact-torch on
    the same batches in the same run. Resumable: a rerun keeps the rows already written (a row is
    its kind, data, N, steps and the --param values given) unless --rerun.
    """
    from benchmarks.stream import StreamBench, run_stream, stream_markdown
    from faiss_index import IndexFormatError, IndexInputError

    given = dict(params)
    for d in _words(data) or ():
        if d not in ("clusters", "class-pure") and not d.startswith("trained:"):
            raise click.BadParameter(f"{d!r}: use clusters, class-pure or trained:INDEX_DIR", param_hint="--data")
    cfg = StreamBench(ns=ns, data=_words(data) or (), kind=kind, params=given, refresh_every=refresh_every,
                      cycles=cycles, exact_every=max(1, exact_every), batch=batch, classes=classes, seed=seed, out=out,
                      rerun=rerun, progress=progress)
    if any(batch > n for n in ns):
        raise click.BadParameter(f"a batch of {batch} needs N >= {batch}", param_hint="--batch")
    try:
        result = run_stream(cfg, command=_invocation(ctx))
    except (ValueError, IndexFormatError, IndexInputError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(stream_markdown(result))
    click.echo(f"wrote {out}, {Path(out).with_suffix('.md')} and {Path(out).with_suffix('.png')}")


@bench.command("train")
@click.option("--memory", default="10000,100000,1000000", show_default=True, callback=_ints("--memory"),
              help="Memory sizes (samples held by the miner), comma-separated.")
@click.option("--ann", "anns", default="none,exact,faiss", show_default=True,
              help="Distractor sources to time, comma-separated: none, exact, faiss.")
@click.option("--faiss-index", default="auto", show_default=True,
              help="Index kinds timed for --ann faiss, comma-separated; auto: the engine's default for the device "
                   "(what `nil train --ann faiss` uses).")
@click.option("--mid-refresh/--after-build", default=True, show_default=True,
              help="Time FAISS rows halfway through a refresh cycle (the average step), or right after a build.")
@click.option("--steps", default=20, show_default=True, help="Timed training steps per row.")
@click.option("--warmup", default=3, show_default=True, help="Untimed steps first.")
@click.option("--batch", default=256, show_default=True, help="Batch size.")
@click.option("--model", default="small_cnn", show_default=True, help="Model (small_cnn shows mining's share).")
@click.option("--classes", default=9, show_default=True, help="Classes of the synthetic patch store.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--out", default="benchmarks/results/train.json", show_default=True, type=click.Path(),
              help="Result JSON; the .md table is written beside it.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@click.pass_context
def bench_train(ctx, memory, anns, faiss_index, mid_refresh, steps, warmup, batch, model, classes, seed, device, out,
                progress):
    """Time the trainer's step and the share distractor mining and the memory update take of it.

    Runs nil's own training step (small CNN, 32x32 synthetic patches) with distractors from the batch
    (--ann none), an exact memory and the FAISS engine, the memory prefilled to each size with seeded
    embeddings so no epoch over a million images is needed.
    """
    from benchmarks.report import train_markdown
    from benchmarks.train_step import TrainBench, run_train_bench

    cfg = TrainBench(memory=memory, anns=_words(anns) or (), faiss_kinds=_words(faiss_index), mid_refresh=mid_refresh,
                     steps=steps, warmup=warmup, batch=batch, model=model, classes=classes, seed=seed, device=device,
                     out=out, progress=progress)
    result = run_train_bench(cfg, command=_invocation(ctx))
    click.echo(train_markdown(result))
    click.echo(f"wrote {out} and {Path(out).with_suffix('.md')}")


def _invocation(ctx: click.Context) -> str:
    """The command with every option resolved (defaults included), to rerun it exactly."""
    names, c = [], ctx
    while c.parent is not None:  # the root's name is however it was started (nil, python -m cli, ...)
        names.insert(0, c.info_name)
        c = c.parent
    parts = ["nil", *names]
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if not isinstance(p, click.Option) or value is None or p.name == "progress":
            continue
        if p.is_flag and p.secondary_opts:
            parts.append(p.opts[0] if value else p.secondary_opts[0])
        elif p.is_flag:
            if value:
                parts.append(p.opts[0])
        elif p.multiple:  # repeatable: once per value, none when not given
            for v in value:
                parts += [p.opts[0], shlex.quote(f"{v[0]}={v[1]}" if p.type is INDEX_PARAM else str(v))]
        else:
            text = ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)
            parts += [p.opts[0], shlex.quote(text)]
    return " ".join(parts)
