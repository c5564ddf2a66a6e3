"""Open any supported data source as a :class:`Dataset`: detect its format, read it, check it."""

from __future__ import annotations

import logging
from pathlib import Path

from nil.data.base import Dataset
from nil.data.csv_manifest import CsvOptions, read_csv_manifest
from nil.data.folder import read_folder
from nil.data.medmnist import read_medmnist
from nil.data.splits import check_fractions, validate_dataset
from nil.data.zarr_store import read_zarr
from nil.config import FORMATS
from nil.errors import NilError

LOG = logging.getLogger(__name__)



def _is_zarr_group(p: Path) -> bool:
    """A zarr (v2 or v3) group folder holding ``images`` and ``labels`` arrays."""
    def is_node(d: Path) -> bool:
        return any((d / m).is_file() for m in ("zarr.json", ".zgroup", ".zarray"))

    return is_node(p) and is_node(p / "images") and is_node(p / "labels")


def detect_format(path: str | Path) -> str:
    """The format of ``path``: one of :data:`FORMATS`.

    ``.npz`` file: medmnist; ``.csv`` file: csv; folder named ``*.zarr`` or holding a zarr group
    with ``images`` and ``labels``: zarr; any other folder: folder. Otherwise NilError.
    """
    p = Path(path)
    if not p.exists():
        raise NilError(f"{p} does not exist")
    if p.is_dir():
        return "zarr" if p.suffix.lower() == ".zarr" or _is_zarr_group(p) else "folder"
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return "medmnist"
    if suffix == ".csv":
        return "csv"
    raise NilError(
        f"cannot tell the data format of {p}: expected a MedMNIST .npz file, a .csv manifest, "
        f"a .zarr store or a folder of class folders (formats: {', '.join(FORMATS)})"
    )


def open_dataset(
    path: str | Path,
    fmt: str | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    csv: CsvOptions | None = None,
) -> Dataset:
    """Read ``path`` as a checked Dataset of uint8 ``(H, W, C)`` images.

    fmt: one of :data:`FORMATS`, or None to detect it. Sources with their own splits (MedMNIST,
    a ``train/val/test`` folder) keep them; others get a stratified split seeded by ``seed`` with
    ``val_fraction`` and ``test_fraction`` of the samples (``split_origin="seeded"``).
    csv: options for the csv format only.
    """
    p = Path(path)
    if not p.exists():
        raise NilError(f"{p} does not exist")
    if fmt is None:
        fmt = detect_format(p)
    elif fmt not in FORMATS:
        raise NilError(f"unknown data format {fmt!r}: choose one of {', '.join(FORMATS)}")
    check_fractions(val_fraction, test_fraction)
    if csv is not None and fmt != "csv" and any(vars(csv).values()):
        raise NilError(f"CSV options were given but {p} is read as {fmt}")
    split = dict(seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    if fmt == "medmnist":
        ds = read_medmnist(p)
    elif fmt == "folder":
        if not p.is_dir():
            raise NilError(f"{p} is not a folder (format folder)")
        ds = read_folder(p, **split)
    elif fmt == "csv":
        ds = read_csv_manifest(p, csv, **split)
    else:
        ds = read_zarr(p, **split)
    return validate_dataset(ds)
