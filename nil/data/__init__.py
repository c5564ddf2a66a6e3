"""Data sources as one :class:`Dataset` interface: MedMNIST .npz, class folders, CSV manifests,
zarr patch stores; plus the training transform, a chunk-local shuffling sampler and the
synthetic histology-like patch generator."""

from nil.data.base import SPLITS, Dataset, SampleSet, Subset, TorchSplit
from nil.data.csv_manifest import CsvOptions
from nil.data.open import FORMATS, detect_format, open_dataset
from nil.data.sampler import ChunkShuffleSampler
from nil.data.splits import apply_split_record, seeded_split
from nil.data.synth import write_synthetic
from nil.data.transforms import make_transform

__all__ = [
    "FORMATS",
    "SPLITS",
    "ChunkShuffleSampler",
    "CsvOptions",
    "Dataset",
    "SampleSet",
    "Subset",
    "TorchSplit",
    "apply_split_record",
    "detect_format",
    "make_transform",
    "open_dataset",
    "seeded_split",
    "write_synthetic",
]
