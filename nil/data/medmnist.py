"""MedMNIST ``.npz`` files: ``{train,val,test}_images`` and ``{train,val,test}_labels``.

The arrays are small (MedMNIST at 28-224 px), so they are loaded once into memory and the file's
own splits are kept. Sample ids run through train, then val, then test, so they are unique.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np

from nil.data.base import SPLITS, Dataset, SampleSet
from nil.errors import NilError

LOG = logging.getLogger(__name__)


class ArraySampleSet(SampleSet):
    """Images held in memory: ``images`` uint8 ``(N, H, W)`` or ``(N, H, W, C)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray, keys: list[str]):
        super().__init__(labels, ids, keys)
        self.images = images

    def load(self, i: int) -> np.ndarray:
        image = self.images[i]
        return image[:, :, None] if image.ndim == 2 else image


def _check_images(name: str, images: np.ndarray, source: Path) -> None:
    if images.dtype != np.uint8:
        raise NilError(f"{source}: {name} must be uint8, got {images.dtype}")
    if images.ndim == 3 or (images.ndim == 4 and images.shape[3] in (1, 3)):
        return
    raise NilError(
        f"{source}: {name} must have shape (N, H, W) or (N, H, W, 3), got {images.shape}"
    )


def _check_labels(name: str, labels: np.ndarray, n: int, source: Path) -> np.ndarray:
    """Labels of shape (N,) or (N, 1) as int64 (N,)."""
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise NilError(
            f"{source}: {name} must have shape (N,) or (N, 1), got {labels.shape} "
            "(multi-label MedMNIST sets are not supported)"
        )
    if len(labels) != n:
        raise NilError(f"{source}: {name} has {len(labels)} labels for {n} images")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating) or np.any(labels != np.round(labels)):
            raise NilError(f"{source}: {name} must hold integer class labels, got {labels.dtype}")
    return labels.astype(np.int64)


def read_medmnist(path: str | Path) -> Dataset:
    """A MedMNIST ``.npz`` file as a Dataset with the file's own train/val/test splits.

    Images are uint8 ``(N, H, W)`` (grayscale, C=1) or ``(N, H, W, 3)``; classes are
    ``"0".."C-1"`` with C = max label + 1 over all splits; keys are ``"train/17"``.
    """
    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path):
        raise NilError(f"{path}: not a MedMNIST .npz file (it is not a zip archive: damaged, truncated or of another "
                       "format)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as err:  # numpy's text advises allow_pickle, which nil never uses on data files
        raise NilError(f"{path}: holds arrays of Python objects (pickled) or a damaged array; a MedMNIST .npz "
                       "holds plain uint8 image and integer label arrays") from err
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise NilError(f"{path}: cannot read as a MedMNIST .npz file; the archive is damaged ({err})") from err
    images, labels = {}, {}
    for s in SPLITS:
        for key in (f"{s}_images", f"{s}_labels"):
            if key not in arrays:
                raise NilError(f"{path}: missing array {key!r} (has {sorted(arrays)})")
        images[s] = arrays[f"{s}_images"]
        _check_images(f"{s}_images", images[s], path)
        labels[s] = _check_labels(f"{s}_labels", arrays[f"{s}_labels"], len(images[s]), path)
    shapes = {(images[s].shape[1:] + (1,))[:3] for s in SPLITS}  # (H, W, C), C=1 if gray
    if len(shapes) != 1:
        raise NilError(f"{path}: the splits hold images of different shapes {sorted(shapes)}")
    h, w, c = shapes.pop()
    num_classes = int(max(labels[s].max(initial=-1) for s in SPLITS)) + 1
    parts, start = {}, 0
    for s in SPLITS:
        n = len(labels[s])
        ids = np.arange(start, start + n, dtype=np.int64)
        parts[s] = ArraySampleSet(images[s], labels[s], ids, [f"{s}/{i}" for i in range(n)])
        start += n
    LOG.info("%s: MedMNIST %s images, %d classes, splits %s", path, (h, w, c), num_classes,
             {s: len(parts[s]) for s in SPLITS})
    return Dataset(
        classes=[str(k) for k in range(num_classes)],
        train=parts["train"], val=parts["val"], test=parts["test"],
        format="medmnist", source=str(path), channels=c,
        image_size=h if h == w else None, split_origin="file",
    )
