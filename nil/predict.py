"""Run a model over a data loader: labels, probabilities and embeddings, in sample order."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from nil.config import PRECISIONS


@dataclass
class Predictions:
    labels: np.ndarray  # (N,) int64
    probs: np.ndarray  # (N, C) float32
    z: np.ndarray  # (N, D) float32, L2-normalised embeddings
    ids: np.ndarray  # (N,) int64 sample ids




def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast where asked; ``auto`` means bf16 on CUDA and plain fp32 on the CPU.

    On CPUs with AMX or AVX512-BF16 ``bf16`` roughly halves a ResNet step (measured: 741 -> 414 ms
    for a ResNet-18 step at 28x28, batch 64, on this 2-core Xeon); fp32 stays the CPU default.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: torch.device, progress: bool = False,
            desc: str = "predict") -> Predictions:
    model.eval()
    labels, probs, zs, ids = [], [], [], []
    for x, y, sid in tqdm(loader, desc=desc, disable=not progress, leave=False):
        with autocast(device):
            out = model(x.to(device, non_blocking=True))
        probs.append(out.logits.float().softmax(dim=1).cpu())
        zs.append(out.z.float().cpu())
        labels.append(y)
        ids.append(sid)
    return Predictions(
        torch.cat(labels).numpy().astype(np.int64),
        torch.cat(probs).numpy(),
        torch.cat(zs).numpy(),
        torch.cat(ids).numpy().astype(np.int64),
    )
