"""Plain-text tables for the terminal."""

from __future__ import annotations

from nil.metrics import METRIC_KEYS


def metrics_table(columns: dict[str, dict]) -> str:
    """Metrics side by side: one row per metric, one column per run or split."""
    names = list(columns)
    width = max(12, *(len(n) for n in names))
    lines = [f"{'metric':<18}" + "".join(f"{n:>{width + 2}}" for n in names)]
    for key in METRIC_KEYS:
        cells = []
        for n in names:
            v = columns[n].get(key)
            cells.append(f"{'n/a' if v is None else f'{v:.4f}':>{width + 2}}")
        lines.append(f"{key:<18}" + "".join(cells))
    return "\n".join(lines)
