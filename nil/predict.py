"""Run a model over a data loader: labels, probabilities and embeddings, in sample order."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm


@dataclass
class Predictions:
    labels: np.ndarray  # (N,) int64
    probs: np.ndarray  # (N, C) float32
    z: np.ndarray  # (N, D) float32, L2-normalised embeddings
    ids: np.ndarray  # (N,) int64 sample ids


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on the CPU (deterministic fp32 there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
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
