"""Screening image files before training: a corrupt or truncated file is found up front, not in epoch 3.

Every sample backed by an image file (class folders, CSV manifests) is decoded once, in threads
(PIL releases the GIL while decoding). ``on_bad="fail"`` refuses the dataset naming the first bad
file; ``on_bad="skip"`` leaves the bad files out of their splits and lists them in
``ds.info["skipped_images"]`` (the trainer writes the list to the run folder and counts it in the
metrics). Array-backed sources (MedMNIST .npz, zarr) are checked for shape and dtype by their
readers and are not decoded here.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm.auto import tqdm

from nil.data.base import SPLITS, Dataset
from nil.data.folder import ImageFileSet, read_image
from nil.data.splits import _root, validate_dataset
from nil.config import ON_BAD_IMAGE
from nil.errors import NilError

LOG = logging.getLogger(__name__)

ON_BAD = ON_BAD_IMAGE


def _problem(path) -> str | None:
    """None when ``path`` decodes as an image, else the reason it does not."""
    try:
        read_image(path)
    except NilError as err:
        return str(err.__cause__ or err)
    return None


def screen_images(ds: Dataset, on_bad: str = "fail", progress: bool = False, workers: int | None = None) -> Dataset:
    """``ds`` after decoding every file-backed image once; see the module docstring.

    Returns ``ds`` itself when nothing is wrong (or nothing is file-backed), else a Dataset whose
    splits leave the bad samples out, with ``info["skipped_images"]``: a list of
    ``{"split", "id", "key", "path", "error"}``. Raises NilError for ``on_bad="fail"``, or when
    skipping leaves a class without training samples.
    """
    if on_bad not in ON_BAD:
        raise NilError(f"--on-bad-image must be one of {', '.join(ON_BAD)}, got {on_bad!r}")
    jobs = []  # (split, position in split, path)
    for name in SPLITS:
        root, index = _root(ds.split(name))
        if isinstance(root, ImageFileSet):
            jobs += [(name, pos, root.files[int(i)]) for pos, i in enumerate(index)]
    if not jobs:
        return ds
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        problems = list(tqdm(pool.map(_problem, [j[2] for j in jobs]), total=len(jobs), desc="check images",
                             disable=not progress, leave=False))
    bad = [(job, why) for job, why in zip(jobs, problems) if why is not None]
    if not bad:
        return ds
    (split, pos, path), why = bad[0]
    if on_bad == "fail":
        raise NilError(f"cannot read image {path} ({why}); {len(bad)} of {len(jobs)} image files are unreadable. "
                       "Fix or remove them, or pass --on-bad-image skip to train without them")
    skipped, keep = [], {}
    for (split, pos, path), why in bad:
        s = ds.split(split)
        skipped.append({"split": split, "id": int(s.ids[pos]), "key": str(s.keys[pos]), "path": str(path),
                        "error": why})
    for name in SPLITS:
        s = ds.split(name)
        drop = {pos for (split, pos, _), _ in bad if split == name}
        keep[name] = s.subset(np.array([i for i in range(len(s)) if i not in drop], dtype=np.int64)) if drop else s
    LOG.warning("%s: skipping %d unreadable image files, e.g. %s", ds.source, len(skipped), skipped[0]["path"])
    info = dict(ds.info) | {"skipped_images": skipped}
    out = Dataset(classes=ds.classes, train=keep["train"], val=keep["val"], test=keep["test"], format=ds.format,
                  source=ds.source, channels=ds.channels, image_size=ds.image_size, split_origin=ds.split_origin,
                  info=info)
    return validate_dataset(out)
