"""The image-to-tensor transform of training and evaluation (torchvision.transforms.v2)."""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
from torchvision.transforms import v2

LOG = logging.getLogger(__name__)


class ImageTransform:
    """uint8 ``(H, W, C)`` array -> float32 ``(channels, image_size, image_size)`` tensor.

    Matches the channel count first (RGB -> gray by luminance, gray -> RGB by repetition),
    resizes with antialiasing (torchvision skips it when the size already matches), scales
    to [0, 1] and normalises per channel: mean 0.5 and std 0.5 (values in [-1, 1]) unless
    ``normalize`` gives the statistics published weights expect (``{"mean": [...], "std": [...]}``).
    With ``train=True`` random horizontal and vertical flips come first: tissue and fundus
    images have no preferred orientation.
    """

    def __init__(self, train: bool, image_size: int, channels: int, normalize: dict | None = None):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.train, self.image_size, self.channels = train, image_size, channels
        norm = normalize or {"mean": [0.5] * channels, "std": [0.5] * channels}
        steps: list = [v2.ToImage()]
        if train:
            steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
        steps += [
            v2.Resize((image_size, image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(norm["mean"]), list(norm["std"])),
        ]
        self.pipeline = v2.Compose(steps)

    def _match_channels(self, image: np.ndarray) -> np.ndarray:
        if image.ndim == 2:
            image = image[:, :, None]
        c = image.shape[2]
        if c == self.channels:
            return image
        if self.channels == 3 and c == 1:
            return np.repeat(image, 3, axis=2)
        if self.channels == 1 and c == 3:
            gray = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            return np.clip(np.rint(gray), 0, 255).astype(np.uint8)[:, :, None]
        raise ValueError(f"cannot turn an image of {c} channels into {self.channels}")

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.pipeline(np.ascontiguousarray(self._match_channels(image)))

    def __repr__(self) -> str:
        return (f"ImageTransform(train={self.train}, image_size={self.image_size}, "
                f"channels={self.channels})")


def data_statistics(samples, image_size: int, channels: int, limit: int = 1024, seed: int = 0) -> dict:
    """Per-channel mean and std of ``samples`` as the model sees them (channels matched, resized, in [0, 1]).

    A seeded sample of at most ``limit`` images: enough for two decimals, cheap for image files.
    A channel with no spread (std below 1/255) keeps std 1/255 so normalising never divides by ~0.
    """
    if len(samples) == 0:
        raise ValueError("the training split is empty: no statistics to normalise with")
    rows = np.random.default_rng(seed).permutation(len(samples))[:limit]
    scale = ImageTransform(False, image_size, channels, {"mean": [0.0] * channels, "std": [1.0] * channels})
    x = torch.stack([scale(samples.load(int(i))) for i in np.sort(rows)]).double()  # (n, C, S, S)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1 / 255)
    return {"mean": [round(float(m), 4) for m in mean], "std": [round(float(s), 4) for s in std]}


def make_transform(train: bool, image_size: int, channels: int,
                   normalize: dict | None = None) -> Callable[[np.ndarray], torch.Tensor]:
    """The transform for one split: uint8 ``(H, W, C)`` -> float32 ``(channels, S, S)``, S=image_size."""
    return ImageTransform(train, image_size, channels, normalize)
