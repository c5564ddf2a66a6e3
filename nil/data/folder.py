"""Image files on disk: one subfolder per class (``root/ADI/xxx.tif``, as NCT-CRC-HE-100K).

Two layouts: ``root/<class>/...`` (split by nil with a seed) or ``root/{train,val,test}/<class>/...``
(the folder's own splits). Files are decoded lazily with PIL, as RGB. :class:`ImageFileSet` is
shared with the CSV manifest reader.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from nil.data.base import SPLITS, Dataset, SampleSet
from nil.data.splits import seeded_dataset
from nil.errors import NilError

LOG = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def read_image(path: str | Path) -> np.ndarray:
    """The image file at ``path`` as uint8 ``(H, W, 3)`` RGB; NilError naming it if unreadable."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)  # a writable copy (torch warns on read-only arrays)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise NilError(f"cannot read image {path}: {err}") from err


class ImageFileSet(SampleSet):
    """Images stored one per file, decoded on each :meth:`load` as uint8 ``(H, W, 3)``."""

    def __init__(self, files: Sequence[Path], labels: np.ndarray, ids: np.ndarray,
                 keys: Sequence[str]):
        super().__init__(labels, ids, keys)
        self.files = list(files)

    def load(self, i: int) -> np.ndarray:
        return read_image(self.files[i])


def is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _subdirs(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_files(root: Path) -> dict[str, list[Path]]:
    """``{class name: sorted image files}`` for the class folders directly under ``root``."""
    classes = _subdirs(root)
    if not classes:
        raise NilError(f"{root}: no class folders found (expected {root}/<class>/<image files>)")
    out = {}
    for d in classes:
        files = sorted((f for f in d.rglob("*") if is_image(f)), key=lambda f: f.as_posix())
        if not files:
            raise NilError(
                f"{root}: class folder {d.name!r} holds no images ({', '.join(IMAGE_SUFFIXES)})"
            )
        out[d.name] = files
    return out


def has_split_layout(root: Path) -> bool:
    """True when ``root`` holds ``train/`` and the other split folders rather than classes."""
    names = {d.name for d in _subdirs(root)}
    return "train" in names and names <= set(SPLITS)


def read_folder(
    path: str | Path, *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> Dataset:
    """A class-per-subfolder image tree as a Dataset.

    Classes are the sorted class folder names. Sample ids are positions in the sorted
    ``(split, class, file)`` list, keys the file paths relative to ``path``. With the
    ``train/val/test`` layout the folder's splits are kept, otherwise a seeded stratified split.
    """
    root = Path(path)
    if has_split_layout(root):
        missing = [s for s in SPLITS if not (root / s).is_dir()]
        if missing:
            raise NilError(f"{root}: split layout lacks the folder(s) {', '.join(missing)}")
        per_split = {s: _class_files(root / s) for s in SPLITS}
        classes = sorted(set().union(*per_split.values()))
    else:
        per_split = {"all": _class_files(root)}
        classes = sorted(per_split["all"])
    lookup = {c: k for k, c in enumerate(classes)}
    parts, start = {}, 0
    for name, by_class in per_split.items():
        files = [f for c in sorted(by_class) for f in by_class[c]]
        labels = np.array([lookup[c] for c in sorted(by_class) for _ in by_class[c]], np.int64)
        ids = np.arange(start, start + len(files), dtype=np.int64)
        keys = [f.relative_to(root).as_posix() for f in files]
        parts[name] = ImageFileSet(files, labels, ids, keys)
        start += len(files)
    LOG.info("%s: %d image files in %d classes", root, start, len(classes))
    common = dict(format="folder", source=str(root), channels=3, image_size=None)
    if "all" in parts:
        return seeded_dataset(parts["all"], classes, seed=seed, val_fraction=val_fraction,
                              test_fraction=test_fraction, **common)
    return Dataset(classes=classes, train=parts["train"], val=parts["val"], test=parts["test"],
                   split_origin="file", **common)
