"""Images to embeddings with a trained checkpoint: a whole split (for indexes and reports) or one image
(for ``nil index query --image`` and the service's image search)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nil.data import make_transform
from nil.evaluate import load_model, open_with_checkpoint
from nil.loaders import checkpoint_loader
from nil.predict import predict
from nil.runtime import resolve_device


def embed_split(checkpoint: str | Path, data: str | None = None, split: str = "train", fmt: str | None = None,
                batch_size: int = 256, device: str = "auto", progress: bool = True) -> dict:
    """Embed one split with a checkpoint: ``vectors`` (N, D) float32, ``labels``, ``ids``, ``keys``, ``classes``."""
    dev = resolve_device(device)
    model, ckpt, cfg, ds = open_with_checkpoint(checkpoint, data, fmt, dev)
    samples = ds.split(split)
    loader = checkpoint_loader(samples, ckpt, cfg=cfg, channels=ds.channels, device=dev, batch_size=batch_size)
    p = predict(model, loader, dev, progress=progress, desc=f"embed {split}")
    return {"vectors": p.z, "labels": p.labels, "ids": p.ids, "keys": [str(k) for k in samples.keys],
            "classes": ds.classes, "source": f"{cfg.data}:{split}"}


class ImageEmbedder:
    """One image -> (z (D,) float32, predicted class), with a checkpoint's model and evaluation transform."""

    def __init__(self, checkpoint: str | Path, device: torch.device):
        self.model, ckpt = load_model(checkpoint, device)
        spec = ckpt["model_spec"]
        self.device, self.dim = device, spec["embed_dim"]
        self.mode = "L" if spec["in_channels"] == 1 else "RGB"  # what a PIL image is converted to
        self.transform = make_transform(False, spec["image_size"], spec["in_channels"], spec.get("normalize"))

    def pixels(self, image) -> np.ndarray:
        """A PIL image as the (H, W, C) uint8 array the model's transform takes."""
        arr = np.array(image.convert(self.mode))
        return arr[:, :, None] if arr.ndim == 2 else arr

    def __call__(self, arr: np.ndarray) -> tuple[np.ndarray, int]:
        x = self.transform(arr)[None].to(self.device)
        with torch.no_grad():
            out = self.model(x)
        return out.z.float().cpu().numpy()[0], int(out.logits.argmax(1).item())
