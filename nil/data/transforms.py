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


def make_transform(train: bool, image_size: int, channels: int,
                   normalize: dict | None = None) -> Callable[[np.ndarray], torch.Tensor]:
    """The transform for one split: uint8 ``(H, W, C)`` -> float32 ``(channels, S, S)``, S=image_size."""
    return ImageTransform(train, image_size, channels, normalize)
