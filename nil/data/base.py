"""The one dataset interface every reader produces.

A reader turns a file or folder into a :class:`Dataset`: class names plus three
:class:`SampleSet` splits. A split yields ``(image, label, sample_id)`` where the image is a
``uint8`` array ``(H, W, C)``; :class:`TorchSplit` adds the tensor transform for training.
Sample ids are stable integers, unique across the three splits: the distractor index keys on them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from nil.config import SPLITS
from nil.errors import NilError



class SampleSet:
    """One split: random access to ``uint8 (H, W, C)`` images, with labels, ids and keys.

    Subclasses implement :meth:`load`. ``labels`` and ``ids`` are ``int64 (N,)`` arrays,
    ``keys`` a sequence of N strings naming each sample (a file path, ``"train/17"``, ...).
    """

    def __init__(self, labels: np.ndarray, ids: np.ndarray, keys: Sequence[str]):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.ids = np.asarray(ids, dtype=np.int64)
        self.keys = keys
        if not (len(self.labels) == len(self.ids) == len(self.keys)):
            raise NilError("labels, ids and keys must have the same length")

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> np.ndarray:
        """Image ``i`` as ``uint8 (H, W, C)``."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        return self.load(i), int(self.labels[i]), int(self.ids[i])

    def load_many(self, index: np.ndarray) -> list[np.ndarray]:
        """Images at the positions ``index``, in that order (a store may read them grouped)."""
        return [self.load(int(i)) for i in index]

    def random_reader(self, cache_bytes: int) -> "SampleSet":
        """This split for scattered reads (mined distractors), keeping up to ``cache_bytes`` of
        decoded storage; a set held in memory is its own reader."""
        return self

    def subset(self, index: np.ndarray) -> "SampleSet":
        return Subset(self, np.asarray(index, dtype=np.int64))

    def chunk_size(self) -> int | None:
        """Number of consecutive samples stored together (zarr chunk), or None."""
        return None


class Subset(SampleSet):
    """The samples of ``parent`` at positions ``index`` (used for seeded splits)."""

    def __init__(self, parent: SampleSet, index: np.ndarray):
        self.parent, self.index = parent, index
        keys = [parent.keys[int(i)] for i in index]
        super().__init__(parent.labels[index], parent.ids[index], keys)

    def load(self, i: int) -> np.ndarray:
        return self.parent.load(int(self.index[i]))

    def load_many(self, index: np.ndarray) -> list[np.ndarray]:
        return self.parent.load_many(self.index[np.asarray(index, dtype=np.int64)])

    def random_reader(self, cache_bytes: int) -> SampleSet:
        reader = copy.copy(self)
        reader.parent = self.parent.random_reader(cache_bytes)
        return reader

    def chunk_size(self) -> int | None:
        return self.parent.chunk_size()


@dataclass
class Dataset:
    """Class names and the train/val/test splits of one data source."""

    classes: list[str]
    train: SampleSet
    val: SampleSet
    test: SampleSet
    format: str
    source: str
    channels: int
    image_size: int | None  # side of the stored images when they all share one, else None
    split_origin: str = "file"  # "file": the data's own splits; "seeded": made by nil
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SampleSet:
        if name not in SPLITS:
            raise NilError(f"unknown split {name!r}: choose one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def split_record(self) -> dict:
        """What to save in a run folder to reproduce the splits exactly."""
        return {
            "origin": self.split_origin,
            "format": self.format,
            "source": self.source,
            "counts": {s: len(self.split(s)) for s in SPLITS},
            "ids": {s: self.split(s).ids.tolist() for s in SPLITS},
        }


class TorchSplit(torch.utils.data.Dataset):
    """A :class:`SampleSet` as a torch dataset: ``(image float (C, H, W), label, sample_id)``."""

    def __init__(self, samples: SampleSet, transform: Callable[[np.ndarray], torch.Tensor]):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        image, label, sid = self.samples[i]
        return self.transform(image), label, sid
