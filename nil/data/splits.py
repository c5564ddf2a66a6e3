"""Seeded stratified splits, the checks every dataset passes, and rebuilding splits from a record.

Readers whose data has no splits of its own hand one pool of samples to :func:`seeded_dataset`.
:func:`validate_dataset` is called by ``open_dataset`` on every reader's result, so the checks
(labels in range, every class trained on, unique sample ids) live in one place.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
from sklearn.model_selection import train_test_split

from nil.data.base import SPLITS, Dataset, SampleSet, Subset
from nil.errors import NilError

LOG = logging.getLogger(__name__)


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise NilError unless both fractions are in [0, 1) and leave some data for training."""
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise NilError(f"{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise NilError(
            f"val_fraction + test_fraction must be below 1, got {val_fraction} + {test_fraction}"
        )


def _split_off(
    index: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``index`` into (rest, taken) with ``fraction`` of it taken, stratified when possible."""
    n_take = int(round(fraction * len(index)))
    if n_take == 0:
        return index, index[:0]
    if n_take >= len(index):
        raise NilError(f"a split of {fraction} leaves no samples for training out of {len(index)}")
    try:
        rest, taken = train_test_split(
            index, test_size=n_take, random_state=seed, stratify=labels[index]
        )
    except ValueError as err:  # a class too small to appear on both sides
        LOG.warning("stratified split impossible (%s); using an unstratified seeded split", err)
        rest, taken = train_test_split(index, test_size=n_take, random_state=seed)
    return np.sort(rest), np.sort(taken)


def seeded_split(
    labels: np.ndarray, seed: int, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> dict[str, np.ndarray]:
    """Positions of the train/val/test samples of a pool, stratified by label and seeded.

    labels: (N,) int. Returns ``{"train": idx, "val": idx, "test": idx}``, each a sorted
    ``int64`` array of positions (sorted so that chunked stores are read in order); together
    they are a partition of ``range(N)``. The same labels and seed give the same split.
    """
    check_fractions(val_fraction, test_fraction)
    labels = np.asarray(labels, dtype=np.int64)
    everything = np.arange(len(labels), dtype=np.int64)
    rest, test = _split_off(everything, labels, test_fraction, seed)
    # val_fraction is of the whole pool, so scale it to what the test split left.
    val_of_rest = val_fraction / (1.0 - test_fraction) if test_fraction else val_fraction
    # A different seed for the second cut so the two cuts are not correlated.
    train, val = _split_off(rest, labels, val_of_rest, seed + 1)
    return {"train": train, "val": val, "test": test}


def seeded_dataset(
    pool: SampleSet,
    classes: list[str],
    *,
    format: str,
    source: str,
    channels: int,
    image_size: int | None,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    info: dict | None = None,
) -> Dataset:
    """A :class:`Dataset` whose splits are a seeded stratified split of ``pool``."""
    parts = seeded_split(pool.labels, seed, val_fraction, test_fraction)
    info = dict(info or {})
    info.update(seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    return Dataset(
        classes=list(classes),
        train=pool.subset(parts["train"]),
        val=pool.subset(parts["val"]),
        test=pool.subset(parts["test"]),
        format=format,
        source=source,
        channels=channels,
        image_size=image_size,
        split_origin="seeded",
        info=info,
    )


def validate_dataset(ds: Dataset) -> Dataset:
    """Check labels are in ``[0, num_classes)``, every class has training samples, ids are unique.

    Returns ``ds`` unchanged; raises NilError naming the first problem found.
    """
    c = ds.num_classes
    if c < 2:
        raise NilError(f"{ds.source}: needs at least 2 classes, found {c}")
    for name in SPLITS:
        labels = ds.split(name).labels
        bad = labels[(labels < 0) | (labels >= c)]
        if len(bad):
            raise NilError(
                f"{ds.source}: {name} split has label {int(bad[0])} outside 0..{c - 1} "
                f"({len(bad)} such samples)"
            )
    counts = np.bincount(ds.train.labels, minlength=c)
    empty = [ds.classes[k] for k in np.flatnonzero(counts == 0)]
    if empty:
        raise NilError(f"{ds.source}: class {empty[0]!r} has no training samples")
    ids = np.concatenate([ds.split(s).ids for s in SPLITS])
    if len(np.unique(ids)) != len(ids):
        dup = [i for i, k in Counter(ids.tolist()).items() if k > 1][:5]
        raise NilError(f"{ds.source}: duplicated sample ids, e.g. {dup}")
    return ds


def apply_split_record(ds: Dataset, record: dict) -> Dataset:
    """``ds`` with its splits replaced by those saved in ``record`` (from ``split_record()``).

    Finds each recorded id among all samples of ``ds``; raises NilError when the record was
    made from another source or names ids that ``ds`` does not have.
    """
    if record.get("format") != ds.format:
        raise NilError(f"split record is for format {record.get('format')!r}, data is {ds.format!r}")
    parts = [ds.split(s) for s in SPLITS]
    all_ids = np.concatenate([p.ids for p in parts])
    owner = np.concatenate([np.full(len(p), k) for k, p in enumerate(parts)])
    pos = np.concatenate([np.arange(len(p)) for p in parts])
    order = np.argsort(all_ids, kind="stable")
    new = {}
    for name in SPLITS:
        want = np.asarray(record["ids"][name], dtype=np.int64)
        at = np.searchsorted(all_ids[order], want)
        at = np.minimum(at, len(order) - 1)
        found = all_ids[order][at] == want if len(order) else np.zeros(len(want), bool)
        if not found.all():
            raise NilError(
                f"split record names {int((~found).sum())} {name} ids missing from {ds.source}, "
                f"e.g. {want[~found][:5].tolist()}"
            )
        src = order[at]
        new[name] = _gather(parts, owner[src], pos[src])
    return Dataset(
        classes=ds.classes, train=new["train"], val=new["val"], test=new["test"],
        format=ds.format, source=ds.source, channels=ds.channels, image_size=ds.image_size,
        split_origin=record.get("origin", ds.split_origin), info=dict(ds.info),
    )


def _gather(parts: list[SampleSet], owner: np.ndarray, pos: np.ndarray) -> SampleSet:
    """Samples taken from several splits, as one SampleSet (a Subset when they share a parent)."""
    roots = [_root(p) for p in parts]
    base = roots[0][0]
    if all(r[0] is base for r in roots):  # seeded splits of one pool: index the pool directly
        index = np.empty(len(pos), dtype=np.int64)
        for k, (_, idx) in enumerate(roots):
            sel = owner == k
            index[sel] = idx[pos[sel]]
        return base.subset(index)
    return _Gathered(parts, owner, pos)


def _root(s: SampleSet) -> tuple[SampleSet, np.ndarray]:
    """The innermost parent of a chain of Subsets and the positions of ``s`` in it."""
    index = np.arange(len(s), dtype=np.int64)
    while isinstance(s, Subset):
        index = s.index[index]
        s = s.parent
    return s, index


class _Gathered(SampleSet):
    """Samples drawn from several SampleSets (file splits reassigned by a record)."""

    def __init__(self, parts: list[SampleSet], owner: np.ndarray, pos: np.ndarray):
        self.parts, self.owner, self.pos = parts, owner, pos
        offset = np.cumsum([0] + [len(p) for p in parts])[owner] + pos  # position in all parts
        labels = np.concatenate([p.labels for p in parts])[offset]
        ids = np.concatenate([p.ids for p in parts])[offset]
        keys = [parts[int(o)].keys[int(p)] for o, p in zip(owner, pos)]
        super().__init__(labels, ids, keys)

    def load(self, i: int) -> np.ndarray:
        return self.parts[int(self.owner[i])].load(int(self.pos[i]))
