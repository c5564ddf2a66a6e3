"""Where a run reports besides ``metrics.jsonl`` (``nil train --log``).

- ``csv``: ``RUN_DIR/metrics.csv``, one row per epoch, nested fields flattened (``val/auc``,
  ``mining/audit_recall_at_1``); rewritten from the whole history each epoch, so a resumed run's
  table is the uninterrupted run's table.
- ``tensorboard``: event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR``): every
  number of an epoch line as a scalar (loss parts, validation metrics, mining recall and timings,
  learning rate, epoch seconds) and, at the end, the best epoch's embeddings of a validation sample
  with labels and thumbnails for the projector. Needs the ``tensorboard`` package (``nil[tensorboard]``).
- ``none``: nothing beyond ``metrics.jsonl``.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from nil.data.base import TorchSplit
from nil.data.transforms import ImageTransform
from nil.errors import NilError
from nil.predict import predict

PROJECTOR_SAMPLES = 512  # validation images shown in the projector
THUMBNAIL = 32  # their side in pixels


def require(kind: str) -> None:
    """Refuse up front, before anything is written, a log whose library is missing."""
    if kind == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise NilError("--log tensorboard needs the tensorboard package: pip install 'nil[tensorboard]' "
                       "(or choose --log csv)")


def flatten(line: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested epoch line under ``a/b`` names (lists as ``a/0``, ``a/1``; no text, no None)."""
    out: dict[str, float] = {}
    for key, value in line.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, f"{name}/")
        elif isinstance(value, (list, tuple)):
            out |= flatten({str(i): v for i, v in enumerate(value)}, f"{name}/")
        elif isinstance(value, (bool, int, float)) and not (isinstance(value, float) and math.isnan(value)):
            out[name] = float(value)
    return out


class RunLog:
    """``--log none``: the interface; every method does nothing."""

    def epoch(self, history: list[dict]) -> None:
        """Called after each epoch with every epoch line so far (the last one is new)."""

    def embeddings(self, model: torch.nn.Module, samples, classes: list[str], transform, device: torch.device) -> None:
        """Called once with the best epoch's model loaded."""

    def close(self) -> None:
        pass


class CsvLog(RunLog):
    def __init__(self, out: Path):
        self.path = Path(out) / "metrics.csv"

    def epoch(self, history: list[dict]) -> None:
        table = pd.DataFrame([flatten(line) for line in history])
        tmp = self.path.with_suffix(".csv.tmp")
        table.to_csv(tmp, index=False)
        tmp.replace(self.path)  # a reader never sees half a table


class TensorBoardLog(RunLog):
    def __init__(self, out: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(out) / "tensorboard"))

    def epoch(self, history: list[dict]) -> None:
        line = history[-1]
        for name, value in flatten({k: v for k, v in line.items() if k != "epoch"}).items():
            self.writer.add_scalar(name, value, global_step=int(line["epoch"]))
        self.writer.flush()

    @torch.no_grad()
    def embeddings(self, model, samples, classes, transform, device) -> None:
        """z of a seeded sample of ``samples`` (the validation split) with class names and thumbnails."""
        if len(samples) == 0:
            return
        rows = np.sort(np.random.default_rng(0).permutation(len(samples))[:PROJECTOR_SAMPLES])
        sample = samples.subset(rows)
        z = torch.from_numpy(predict(model, DataLoader(TorchSplit(sample, transform), batch_size=128), device).z)
        images = [sample.load(i) for i in range(len(sample))]
        c = transform.channels
        thumbnail = ImageTransform(False, THUMBNAIL, c, {"mean": [0.0] * c, "std": [1.0] * c})  # pixels in [0, 1]
        thumbs = torch.stack([thumbnail(im) for im in images])
        labels = [classes[int(samples.labels[i])] for i in rows]
        self.writer.add_embedding(z, metadata=labels, label_img=thumbs.clamp(0, 1), tag="z_best_epoch")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_log(kind: str, out: Path) -> RunLog:
    require(kind)
    return {"csv": CsvLog, "tensorboard": TensorBoardLog}.get(kind, lambda _: RunLog())(out)
