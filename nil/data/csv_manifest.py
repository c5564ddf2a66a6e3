"""A CSV manifest naming image files and their labels.

Two shapes are understood: a path column plus one label column (APTOS 2019 ``train.csv``:
``id_code,diagnosis``, images at ``<root>/<id_code>.png``), or a path column plus one-hot class
columns (ISIC 2018 Task 3: ``image,MEL,NV,...,VASC``, images at ``<root>/<image>.jpg``).
Column names, the image folder and the file suffix are found automatically unless given in
:class:`CsvOptions`. The manifest has no splits: nil makes a seeded stratified one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from nil.data.base import Dataset
from nil.data.folder import IMAGE_SUFFIXES, ImageFileSet
from nil.data.splits import seeded_dataset
from nil.errors import NilError

LOG = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "filepath", "file", "filename", "image", "image_id", "id_code", "isic_id")
LABEL_COLUMNS = ("label", "diagnosis", "class", "target", "grade", "level", "dx")  # dx: HAM10000
TRY_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif")


@dataclass
class CsvOptions:
    """How to read a CSV manifest; every field left None is detected from the file."""

    path_col: str | None = None  # column of image paths or ids; default: first of PATH_COLUMNS
    label_col: str | None = None  # column of class labels; default: first of LABEL_COLUMNS
    label_cols: list[str] | None = None  # one-hot class columns; default: the 0/1 columns
    image_root: str | None = None  # folder the paths are relative to; default: the CSV's folder
    suffix: str | None = None  # appended to each path, e.g. ".png"; default: detected


def _find_column(df: pd.DataFrame, given: str | None, candidates: tuple[str, ...], what: str,
                 source: Path) -> str | None:
    """The column ``given``, or else the first of ``candidates`` (any case), or None."""
    if given is not None:
        if given not in df.columns:
            raise NilError(f"{source}: no column {given!r} ({what}); columns are {list(df.columns)}")
        return given
    lower = {str(c).lower(): c for c in df.columns}
    for name in candidates:
        if name in lower:
            return lower[name]
    return None


def _is_binary(col: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(col) and bool(col.isin([0, 1]).all())


def _onehot_labels(df: pd.DataFrame, cols: list[str], source: Path) -> tuple[np.ndarray, list[str]]:
    for c in cols:
        if c not in df.columns:
            raise NilError(f"{source}: no one-hot column {c!r}; columns are {list(df.columns)}")
        if not _is_binary(df[c]):
            raise NilError(f"{source}: one-hot column {c!r} must hold only 0 and 1")
    onehot = df[cols].to_numpy(dtype=np.float64)
    sums = onehot.sum(axis=1)
    bad = np.flatnonzero(sums != 1)
    if len(bad):
        raise NilError(
            f"{source}: {len(bad)} rows have one-hot columns not summing to 1, "
            f"first at row {int(bad[0])} (sum {sums[bad[0]]:g})"
        )
    return onehot.argmax(axis=1).astype(np.int64), [str(c) for c in cols]


def _column_labels(col: pd.Series, source: Path) -> tuple[np.ndarray, list[str]]:
    """Integer labels keep their numbers (classes "0".."max"); others map to sorted names."""
    if col.isna().any():
        raise NilError(f"{source}: label column {col.name!r} is empty at row "
                       f"{int(np.flatnonzero(col.isna().to_numpy())[0])}")
    if pd.api.types.is_numeric_dtype(col):
        values = col.to_numpy()
        if np.all(values == np.round(values)):
            labels = values.astype(np.int64)
            return labels, [str(k) for k in range(max(int(labels.max()), 0) + 1)]
    names = col.astype(str)
    classes = sorted(names.unique())
    lookup = {c: k for k, c in enumerate(classes)}
    return names.map(lookup).to_numpy(dtype=np.int64), classes


def _locate(value: str, roots: list[Path], suffixes: list[str]) -> tuple[Path, str] | None:
    for root in roots:
        for suffix in suffixes:
            if (root / (value + suffix)).is_file():
                return root, suffix
    return None


def read_csv_manifest(
    path: str | Path, options: CsvOptions | None = None, *, seed: int = 0,
    val_fraction: float = 0.1, test_fraction: float = 0.2,
) -> Dataset:
    """A CSV manifest as a Dataset with a seeded stratified split.

    Sample ids are row positions, keys the path column's values; images are RGB
    uint8 ``(H, W, 3)`` read lazily. Every image file is checked to exist up front.
    """
    source, opt = Path(path), options or CsvOptions()
    try:
        df = pd.read_csv(source)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise NilError(f"{source}: cannot read as CSV ({err})") from err
    if len(df) == 0:
        raise NilError(f"{source}: the manifest has no rows")
    path_col = _find_column(df, opt.path_col, PATH_COLUMNS, "image paths", source)
    if path_col is None:
        raise NilError(f"{source}: no image path column among {list(df.columns)}; "
                       f"name one with path_col (looked for {', '.join(PATH_COLUMNS)})")
    if opt.label_cols:
        labels, classes = _onehot_labels(df, list(opt.label_cols), source)
    else:
        label_col = _find_column(df, opt.label_col, LABEL_COLUMNS, "labels", source)
        if label_col is not None:
            labels, classes = _column_labels(df[label_col], source)
        else:
            cols = [c for c in df.columns if c != path_col and _is_binary(df[c])]
            if len(cols) < 2:
                raise NilError(f"{source}: no label column found among {list(df.columns)}; "
                               "name one with label_col, or the one-hot columns with label_cols")
            labels, classes = _onehot_labels(df, cols, source)

    values = df[path_col].astype(str).tolist()
    roots = [Path(opt.image_root)] if opt.image_root else [source.parent, source.parent / "images"]
    if opt.suffix is not None:
        suffixes = [opt.suffix]
    elif Path(values[0]).suffix.lower() in IMAGE_SUFFIXES:
        suffixes = [""]
    else:
        suffixes = ["", *TRY_SUFFIXES]
    found = _locate(values[0], roots, suffixes)
    if found is None:
        tried = [str(r / (values[0] + s)) for r in roots for s in suffixes]
        raise NilError(f"{source}: image of the first row not found; tried {', '.join(tried)}")
    root, suffix = found
    files = [root / (v + suffix) for v in values]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise NilError(f"{source}: {len(missing)} image files missing, e.g. {', '.join(missing[:3])}")
    LOG.info("%s: %d rows, %d classes, images under %s (suffix %r)",
             source, len(df), len(classes), root, suffix)
    pool = ImageFileSet(files, labels, np.arange(len(df), dtype=np.int64), values)
    return seeded_dataset(
        pool, classes, format="csv", source=str(source), channels=3, image_size=None,
        seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
        info={"path_col": path_col, "image_root": str(root), "suffix": suffix},
    )
