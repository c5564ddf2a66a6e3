"""Benchmark results as files: JSON, markdown tables with the goals they are held against, a plot.

Every result file records the command and the machine (and its load) that made it. Files are
written to temporary names and renamed at the end, so a failed run leaves no half-written result.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import machine_info
from benchmarks.measure import KNOBS, faiss_simd, git_revision, load_average, thread_env

LOG = logging.getLogger(__name__)

MINING_RECALL_GOAL = 0.95  # recall@1 the default approximate configuration must reach at N = 1M
MINING_SPEEDUP_GOAL = 10.0  # ... at no more than 1/10 of exact-torch's ms per batch
PEER_SPEEDUP_GOAL = 100.0  # at N = 100k, at least 100x faster per batch than CrossBatchMemory + BatchHardMiner (issue 15; was 50x)
TRAIN_SHARE_GOAL = 0.05  # mining + upsert + refresh under 5% of a training step at 1M memory (issue 15)
GOAL_N, PEER_GOAL_N, TRAIN_GOAL_MEMORY = 1_000_000, 100_000, 1_000_000


# -- generic helpers -------------------------------------------------------------------------------


def fmt(v, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        if digits == 3 or abs(v) < 1:
            return f"{v:.3f}"
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown_head(title: str, result: dict) -> list[str]:
    """The first lines of every result's markdown: its title and the command that made it."""
    return [f"# {title}", "", f"Command: `{result['command']}`", ""]


def machine_lines(result: dict) -> list[str]:
    m = result["machine"]
    gpu = m.get("gpu")
    gpu_text = f"{gpu['name']} ({gpu['memory_gb']} GiB) x{gpu['count']}" if gpu else "none"
    simd = f" (SIMD: {result['faiss_simd']})" if result.get("faiss_simd") else ""
    return [
        f"- machine: {m.get('cpu')}, {m.get('cores')} cores ({m.get('torch_threads')} torch threads), "
        f"{m.get('memory_gb')} GiB RAM, GPU: {gpu_text}",
        f"- software: Python {m.get('python')}, torch {m.get('torch')}, faiss {m.get('faiss')}{simd}, "
        f"{m.get('platform')}",
        f"- load average (1/5/15 min) at start {result.get('load_avg_start')}, at end {result.get('load_avg_end')}"
        " (the machine is shared: other jobs slow every figure)",
        f"- threading environment: {result.get('thread_env') or 'defaults'}",
        f"- code: commit {(result.get('git') or {}).get('commit')}"
        + (f", uncommitted changes in {', '.join(result['git']['uncommitted'])}"
           if (result.get("git") or {}).get("uncommitted") else ""),
    ]


# resolved parameters left out of the tables (the JSON has them all): bookkeeping, not search knobs
_QUIET_PARAMS = ("nlist_per_class", "refresh_every", "niter", "max_points_per_centroid", "seed", "multi_gpu",
                 "chunk", "distance", "miner")


def _params_text(params: dict, quiet: bool = True) -> str:
    shown = {k: v for k, v in params.items() if not (quiet and k in _QUIET_PARAMS)}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values that are not None (sd 0 for one value)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def group_runs(rows: list[dict], keys: tuple[str, ...] = ("dataset", "model", "arm")) -> dict[tuple, list[dict]]:
    """Runs grouped by the values of ``keys``, in first-seen order (one group per arm of a study)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def envelope(command: str, **fields) -> dict:
    """The head of every benchmark result: the command, the machine, the code measured, and the load
    and thread settings at the start; ``fields`` follow."""
    return {"command": command, "machine": machine_info(), "git": git_revision(("faiss_index", "nil", "benchmarks",
                                                                                "cli")),
            "load_avg_start": load_average(), "thread_env": thread_env()} | fields


def close_envelope(result: dict, started: float) -> dict:
    """Stamp the end of a run on its envelope: load average at the end, faiss SIMD level, wall time."""
    result["load_avg_end"] = load_average()
    result["faiss_simd"] = faiss_simd()
    result["elapsed_s"] = round(time.time() - started, 1)
    return result


def write_result(out: str | Path, result: dict, markdown: str, **more: bytes | str) -> None:
    """``out`` (JSON), the markdown beside it (same name, .md) and any ``more`` files (suffix: content), all or none."""
    out = Path(out)
    write_files({out: to_json(result), out.with_suffix(".md"): markdown}
                | {out.with_suffix(suffix): data for suffix, data in more.items()})


def write_files(contents: dict[Path, bytes | str]) -> None:
    """Write all files or none: each to a temporary name first, renamed once all are written."""
    temps = {}
    try:
        for path, data in contents.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # writers in parallel never share one
            if isinstance(data, str):
                tmp.write_text(data)
            else:
                tmp.write_bytes(data)
            temps[path] = tmp
        for path, tmp in temps.items():
            tmp.replace(path)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def to_json(result: dict) -> str:
    return json.dumps(result, indent=1, default=_json_default) + "\n"


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# -- mining ----------------------------------------------------------------------------------------


def _measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "skipped" not in r and "error" not in r and r.get("ms_per_batch") is not None]


def _find(rows: list[dict], method: str, n: int, default: bool = True) -> dict | None:
    for r in _measured(rows):
        if r["method"] == method and r["n"] == n and r.get("default", True) == default:
            return r
    return None


def default_approximate_rows(result: dict, n: int) -> list[dict]:
    """Rows of each approximate kind's default configuration at N = n, fastest first."""
    rows = [r for r in _measured(result["rows"]) if r["n"] == n and not r.get("exact") and r.get("default")]
    return sorted(rows, key=lambda r: r["ms_per_batch"])


def _mid(row: dict, reference_ms: float) -> str:
    """The same comparison halfway through a refresh cycle (the average training step), where measured."""
    mid = row.get("ms_per_batch_mid_refresh")
    if mid is None:
        return ""
    return f" (halfway through a refresh cycle: {mid:.1f} ms = {reference_ms / mid:.1f}x)"


def _speedup_goal(name: str, reference: dict | None, reference_name: str, approx: list[dict], n: int,
                  default_kind: str | None, recall_floor: float | None, speedup_floor: float) -> dict:
    """One "the default approximate kind is X times faster than REFERENCE" goal, over each kind's row."""
    if reference is None or not approx:
        return {"goal": name, "met": None,
                "detail": f"not measured (needs {reference_name} and an approximate kind at N = {n:,})"}
    parts, met_by = [], []
    ref_ms = reference["ms_per_batch"]
    for r in approx:
        speedup = ref_ms / r["ms_per_batch"]
        ok = speedup >= speedup_floor and (recall_floor is None or r["recall_at_1"] >= recall_floor)
        if ok:
            met_by.append(r["method"])
        parts.append(f"{r['method']} ({_params_text(r['params'])}): recall@1 {r['recall_at_1']:.3f}, "
                     f"{r['ms_per_batch']:.1f} ms vs {reference_name} {ref_ms:.1f} ms = {speedup:.1f}x -> "
                     f"{'met' if ok else 'not met'}{_mid(r, ref_ms)}")
    met = (default_kind in met_by) if default_kind else bool(met_by)
    return {"goal": name, "met": met, "default_kind": default_kind, "detail": "; ".join(parts), "met_by": met_by}


def mining_goals(result: dict) -> list[dict]:
    """Each goal with ``met`` (True, False, or None where its figures were not measured) and the figures."""
    rows = result["rows"]
    default_kind = result.get("default_approximate")
    name = (f"At N = {GOAL_N:,}, d = 128, batch 256, the default approximate configuration has recall@1 >= "
            f"{MINING_RECALL_GOAL} at <= 1/{MINING_SPEEDUP_GOAL:.0f} of exact-torch's ms per batch")
    exact_goal = _speedup_goal(name, _find(rows, "exact-torch", GOAL_N), "exact-torch",
                               default_approximate_rows(result, GOAL_N), GOAL_N, default_kind,
                               MINING_RECALL_GOAL, MINING_SPEEDUP_GOAL)
    name = (f"At N = {PEER_GOAL_N:,}, the default approximate configuration is at least {PEER_SPEEDUP_GOAL:.0f}x "
            "faster per batch than CrossBatchMemory + BatchHardMiner")
    peer_goal = _speedup_goal(name, _find(rows, "pml-xbm-batchhard", PEER_GOAL_N), "the peer",
                              default_approximate_rows(result, PEER_GOAL_N), PEER_GOAL_N, default_kind,
                              None, PEER_SPEEDUP_GOAL)
    return [exact_goal, peer_goal]


def _timed_head(title: str, result: dict) -> list[str]:
    """Title, command, machine, device and wall time of a timing benchmark."""
    return markdown_head(title, result) + machine_lines(result) + [
        f"- device: {result['device']}; elapsed {result.get('elapsed_s')} s", ""]


def _verdict(met) -> str:
    return "**met**" if met is True else "**not met**" if met is False else "**not measured**"


def mining_markdown(result: dict) -> str:
    out = _timed_head("Distractor mining: nearest other-class neighbour search", result)
    d = result["data"]
    out += [f"Data: {d['dim']}-d L2-normalised clustered synthetic vectors, {d['classes']} classes x "
            f"{d['clusters_per_class']} tight clusters, {d['classes_per_site']} classes per look-alike site "
            f"(seed {d['seed']}); queries are rows of the data searched with their own ids. recall@1 is against "
            "the reference `knn_other_class` (a tie in distance counts as a hit); ms per batch is the median "
            f"over {result['settings']['batches']} batches after {result['settings']['warmup']} warm-up batches; "
            "upsert ms is one batch's update of existing ids with moved vectors (median); an approximate index "
            "searches the rows changed since its last rebuild exactly, so 'ms/batch mid-refresh' times the same "
            "batches again after refresh_every / 2 batch upserts, the average state during training, and "
            "'refresh s' is one rebuild; peak MB is the "
            "resident-memory high-water mark while the method was built and searched (it includes the "
            "benchmark's own copy of the vectors); index MB is the method's own footprint.", ""]
    headers = ["method", "params", "recall@1", "ms/batch", "queries/s", "ms/batch mid-refresh", "build s",
               "upsert ms", "refresh s", "peak MB", "index MB", "note"]
    for n in sorted({r["n"] for r in result["rows"]}):
        out += [f"## N = {n:,}", ""]
        table = []
        for r in (r for r in result["rows"] if r["n"] == n):
            note = r.get("skipped") or r.get("error") or ("default" if r.get("default") and not r.get("exact")
                                                         else "")
            if r.get("error"):
                note = "error: " + note
            table.append([r["method"], _params_text(r["params"]), fmt(r["recall_at_1"], 3), fmt(r["ms_per_batch"]),
                          fmt(r["queries_per_s"], 0), fmt(r.get("ms_per_batch_mid_refresh")), fmt(r["build_s"], 2), fmt(r["upsert_ms"], 2),
                          fmt(r.get("refresh_s"), 2), fmt(r["peak_mem_mb"], 0), fmt(r.get("index_mb"), 1), note])
        out += [markdown_table(headers, table), ""]
    out += ["## Goals", ""]
    if result.get("default_approximate"):
        out += [f"The engine's default approximate kind is `{result['default_approximate']}`; a goal is met when "
                "that kind's default configuration meets it.", ""]
    for g in result.get("goals", []):
        out += [f"- {g['goal']}: {_verdict(g['met'])}. {g['detail']}."]
    out += [f"- Mining plus upsert plus refresh under {TRAIN_SHARE_GOAL:.0%} of a training step at 1M memory: see `train.md`.", "",
            "Verdicts use the figures right after a build, as the goals state them; the figures halfway "
            "through a refresh cycle are given beside them because they are what a long training run pays "
            "on average.", ""]
    return "\n".join(out)


def _plot_n(result: dict) -> int | None:
    """The N of the first panel: the largest with a measured exact-torch row, else the largest measured."""
    measured = _measured(result["rows"])
    exact = [r["n"] for r in measured if r["method"] == "exact-torch"]
    ns = exact or [r["n"] for r in measured]
    return max(ns) if ns else None


def _knob_value(row: dict) -> float:
    """Where a row sits along its method's knob: its override, else the default's own value."""
    knob = KNOBS.get(row["method"])
    value = (row.get("overrides") or {}).get(knob, row["params"].get(knob) if knob else None)
    return float(value) if isinstance(value, (int, float)) else 0.0


def mining_plot_png(result: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _measured(result["rows"])
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    n_plot = _plot_n(result)
    for m in methods:
        # one curve per method along its knob (nprobe, efSearch): the default has no override
        pts = sorted((r for r in rows if r["method"] == m and r["n"] == n_plot), key=_knob_value)
        if pts:
            left.plot([r["ms_per_batch"] for r in pts], [r["recall_at_1"] for r in pts], "-o", color=colours[m],
                      label=m, markersize=4)
            for i, r in enumerate(pts):
                if r.get("default"):
                    left.plot(r["ms_per_batch"], r["recall_at_1"], "o", color=colours[m], markersize=9,
                              markerfacecolor="none")
                if r.get("overrides"):
                    left.annotate(_params_text(r["overrides"]), (r["ms_per_batch"], r["recall_at_1"]), fontsize=7,
                                  textcoords="offset points", xytext=(4, -10 if i % 2 else 5))
        line = sorted((r for r in rows if r["method"] == m and r.get("default", True)), key=lambda r: r["n"])
        if line:
            right.plot([r["n"] for r in line], [r["ms_per_batch"] for r in line], "-o", color=colours[m], label=m)
    left.set_xscale("log")
    left.axhline(MINING_RECALL_GOAL, color="grey", linestyle=":", linewidth=1)
    left.set_xlabel("ms per batch (log)")
    left.set_ylabel("recall@1 of the nearest other-class neighbour")
    left.set_title(f"Recall vs speed at N = {n_plot:,} (circled: default)" if n_plot else "no measured rows")
    left.legend(fontsize=8)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("N stored vectors (log)")
    right.set_ylabel("ms per batch (log)")
    right.set_title(f"Search time per batch of {result['settings']['batch']} (default configurations)")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{result['machine'].get('cpu')}, {result['machine'].get('cores')} cores, device {result['device']}",
                 fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_mining_outputs(result: dict, out: Path) -> None:
    write_result(out, result, mining_markdown(result), **{".png": mining_plot_png(result)})
    LOG.info("wrote %s, %s and %s", out, out.with_suffix(".md"), out.with_suffix(".png"))


# -- training step -----------------------------------------------------------------------------------


def train_goals(result: dict) -> list[dict]:
    """Mining + upsert + the periodic refresh (amortised) against the share goal; a row without a
    refresh figure (exact memory, batch mining) is judged on mining + upsert alone."""
    name = (f"Mining plus upsert plus refresh take under {TRAIN_SHARE_GOAL:.0%} of a training step at "
            f"{TRAIN_GOAL_MEMORY:,} memory")
    rows = [r for r in result["rows"] if r["memory"] == TRAIN_GOAL_MEMORY and r["ann"] != "none"
            and "skipped" not in r and "error" not in r]
    if not rows:
        return [{"goal": name, "met": None, "detail": f"not measured (no row at memory {TRAIN_GOAL_MEMORY:,})"}]
    parts, met_by, faiss_met = [], [], []
    for r in rows:
        share = r["share_with_refresh"] if r.get("share_with_refresh") is not None else r["share"]
        ok = share < TRAIN_SHARE_GOAL
        label = r["ann"] + (f" ({r['ann_index']})" if r.get("ann_index") else "")
        if ok:
            met_by.append(label)
        if r["ann"] == "faiss":
            faiss_met.append(ok)
        amortised = (f"; with the periodic refresh amortised {r['share_with_refresh']:.1%}"
                     if r.get("share_with_refresh") is not None else "")
        parts.append(f"{label}: mining {r['mining_ms']:.1f} + upsert {r['upsert_ms']:.1f} ms of a "
                     f"{r['ms_per_step']:.1f} ms step = {r['share']:.1%}{amortised} -> {'met' if ok else 'not met'}")
    met = any(faiss_met) if faiss_met else bool(met_by)
    return [{"goal": name, "met": met, "detail": "; ".join(parts), "met_by": met_by}]


def train_markdown(result: dict) -> str:
    out = _timed_head("Training step: where the time goes", result)
    s = result["settings"]
    out += [f"The real trainer's step (`nil.train.train_epoch`: {s['model']} forward and backward, "
            f"`DistractorMiner.mine`, the distractor loss, the optimiser step, `DistractorMiner.update`) on batches of "
            f"{s['batch']} {s['image_size']}x{s['image_size']} patches from a synthetic zarr store "
            f"(`nil.data.synth.write_synthetic`, {s['classes']} classes), loaded before timing so data loading is "
            f"not in the figures. {result['prefill']}", "",
            f"Figures are medians over {s['steps']} steps after {s['warmup']} warm-up steps; share = (mining + "
            "upsert) / step. A FAISS index on CPU moves each upserted row's entry in place (its exact delta "
            "stays empty); other engines search the rows changed since their last rebuild exactly (the delta). "
            "Either may rebuild every `refresh_every` steps (the CPU engine only when its centroids no longer fit)"
            + (", so the steps were timed halfway through a refresh cycle (moved vectors of random stored ids "
               "were upserted first; 'delta at start' is the resulting delta), the average step of a long run"
               if s.get("mid_refresh") else ", and the steps were timed right after a build")
            + "; refresh s is one full rebuild, measured after the timed steps, and the last column adds it "
            "amortised over `refresh_every` steps as if every periodic refresh rebuilt (an upper bound).", ""]
    headers = ["memory", "ann", "index", "ms/step", "mining ms", "upsert ms", "share", "delta at start", "refresh s",
               "refresh every", "share + refresh", "note"]
    table = []
    for r in result["rows"]:
        table.append([fmt(r["memory"]), r["ann"], r.get("ann_index") or "", fmt(r.get("ms_per_step")),
                      fmt(r.get("mining_ms"), 2), fmt(r.get("upsert_ms"), 2),
                      f"{r['share']:.1%}" if r.get("share") is not None else "-", fmt(r.get("delta_rows_at_start")),
                      fmt(r.get("refresh_s"), 2),
                      fmt(r.get("refresh_every")),
                      f"{r['share_with_refresh']:.1%}" if r.get("share_with_refresh") is not None else "-",
                      r.get("skipped") or (("error: " + r["error"]) if r.get("error") else "")])
    out += [markdown_table(headers, table), "", "## Goals", ""]
    for g in result.get("goals", []):
        out.append(f"- {g['goal']}: {_verdict(g['met'])}. {g['detail']}.")
    out.append("")
    return "\n".join(out)


def write_train_outputs(result: dict, out: Path) -> None:
    write_result(out, result, train_markdown(result))
    LOG.info("wrote %s and %s", out, out.with_suffix(".md"))
