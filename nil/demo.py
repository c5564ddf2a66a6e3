"""``nil demo``: the built-in default job, from nothing to a side-by-side table in a few minutes.

It writes the project's own synthetic histology-like patch set (look-alike class pairs), trains a
cross-entropy baseline, a distractor-aware model with `nil train`'s defaults (the gradient
distractor, the study's validation choice) and one mining its distractors with FAISS, and returns
the three runs' test metrics.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from nil.config import TrainConfig
from nil.data.synth import write_synthetic
from nil.train import train

LOG = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: str = ""  # folder for the data and both runs; "" makes runs/demo-<timestamp>
    n: int = 3000  # synthetic patches
    size: int = 32  # patch side
    classes: int = 4  # two look-alike pairs
    similarity: float = 0.8  # closeness of look-alike classes (1 = indistinguishable)
    epochs: int = 6
    model: str = "small_cnn"
    seed: int = 0
    device: str = "auto"
    progress: bool = True


def run_demo(cfg: DemoConfig) -> dict:
    """Returns ``{"out", "data", "runs": {"ce": metrics, "nil": metrics, "nil-faiss": metrics}}``."""
    out = Path(cfg.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    data = out / "synthetic.zarr"
    LOG.info("writing %d synthetic patches to %s", cfg.n, data)
    write_synthetic(data, n=cfg.n, size=cfg.size, classes=cfg.classes, seed=cfg.seed, similarity=cfg.similarity)
    common = dict(data=str(data), model=cfg.model, epochs=cfg.epochs, batch_size=128, lr=2e-3, seed=cfg.seed,
                  device=cfg.device, progress=cfg.progress)
    arms = {
        "ce": TrainConfig(out=str(out / "ce"), loss="ce", ann="none", **common),
        "nil": TrainConfig(out=str(out / "nil"), **common),  # nil train's defaults
        "nil-faiss": TrainConfig(out=str(out / "nil-faiss"), loss="nil", ann="faiss", audit_every=20, **common),
    }
    runs = {}
    for name, arm in arms.items():
        LOG.info("training %s into %s", name, arm.out)
        runs[name] = train(arm) | {"out": arm.out}
    return {"out": str(out), "data": str(data), "runs": runs}
