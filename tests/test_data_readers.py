"""Every reader on small seeded files written here, the shared checks, and the real MedMNIST files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from PIL import Image

from nil.data import (
    FORMATS, SPLITS, CsvOptions, apply_split_record, detect_format, open_dataset, seeded_split,
)
from nil.data.zarr_store import ZarrSampleSet
from nil.errors import NilError


def _all_ids(ds) -> np.ndarray:
    return np.concatenate([ds.split(s).ids for s in SPLITS])


# ---------------------------------------------------------------- MedMNIST .npz

def _npz(path: Path, rgb: bool, flat_labels: bool, classes: int = 3, seed: int = 0,
         counts=(30, 6, 9)) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(SPLITS, counts):
        shape = (n, 8, 8, 3) if rgb else (n, 8, 8)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        labels = np.arange(n) % classes
        arrays[f"{split}_labels"] = labels if flat_labels else labels.reshape(-1, 1)
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("rgb", [True, False])
@pytest.mark.parametrize("flat_labels", [True, False])
def test_medmnist_reads_pixels_labels_and_ids(tmp_path, rgb, flat_labels):
    arrays = _npz(tmp_path / "m.npz", rgb, flat_labels)
    ds = open_dataset(tmp_path / "m.npz")
    assert ds.format == "medmnist" and ds.split_origin == "file"
    assert ds.channels == (3 if rgb else 1) and ds.image_size == 8
    assert ds.classes == ["0", "1", "2"]
    start = 0
    for s in SPLITS:
        part, images = ds.split(s), arrays[f"{s}_images"]
        assert len(part) == len(images)
        np.testing.assert_array_equal(part.labels, arrays[f"{s}_labels"].reshape(-1))
        np.testing.assert_array_equal(part.ids, np.arange(start, start + len(images)))
        start += len(images)
        for i in (0, len(part) - 1):
            image, label, sid = part[i]
            assert image.dtype == np.uint8 and image.shape == (8, 8, ds.channels)
            np.testing.assert_array_equal(image, images[i] if rgb else images[i][:, :, None])
        assert part.keys[3] == f"{s}/3"
    assert len(np.unique(_all_ids(ds))) == sum(len(ds.split(s)) for s in SPLITS)


@pytest.mark.parametrize("change, key", [
    (lambda a: a.pop("val_labels"), "val_labels"),
    (lambda a: a.__setitem__("train_labels", np.zeros((30, 2), np.int64)), "train_labels"),
    (lambda a: a.__setitem__("test_images", np.zeros((9, 8), np.uint8)), "test_images"),
    (lambda a: a.__setitem__("val_labels", np.zeros(5, np.int64)), "val_labels"),
    (lambda a: a.__setitem__("train_images", np.zeros((30, 8, 8, 3), np.float32)), "train_images"),
])
def test_medmnist_wrong_arrays_name_the_key(tmp_path, change, key):
    arrays = _npz(tmp_path / "ok.npz", rgb=False, flat_labels=True)
    change(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(NilError, match=key):
        open_dataset(tmp_path / "bad.npz")


def test_not_an_npz_file(tmp_path):
    (tmp_path / "x.npz").write_text("hello")
    with pytest.raises(NilError, match="x.npz") as err:
        open_dataset(tmp_path / "x.npz")
    assert "allow_pickle" not in str(err.value) and "not a zip archive" in str(err.value)


def test_a_truncated_or_pickled_npz_is_described_by_the_file_not_by_numpy(tmp_path):
    arrays = _npz(tmp_path / "ok.npz", rgb=False, flat_labels=True)
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    np.savez(tmp_path / "obj.npz", **(arrays | {"train_labels": np.array([{"a": 1}] * 3, dtype=object)}))
    for name in ("cut.npz", "obj.npz"):
        with pytest.raises(NilError, match=name) as err:
            open_dataset(tmp_path / name)
        assert "allow_pickle" not in str(err.value), name


def test_real_retinamnist(shared_npz):
    ds = open_dataset(shared_npz("retinamnist.npz"))
    assert [len(ds.split(s)) for s in SPLITS] == [1080, 120, 400]
    assert ds.channels == 3 and ds.image_size == 28 and ds.num_classes == 5
    assert np.bincount(ds.train.labels).tolist() == [486, 128, 206, 194, 66]
    assert np.bincount(ds.test.labels).tolist() == [174, 46, 92, 68, 20]
    assert ds.test[0][0].shape == (28, 28, 3)
    assert len(np.unique(_all_ids(ds))) == 1600


def test_real_breastmnist(shared_npz):
    path = shared_npz("breastmnist.npz")
    with np.load(path) as npz:
        assert npz["train_labels"].shape == (546,)  # stored flat, unlike other MedMNIST files
        first = npz["val_images"][0]
    ds = open_dataset(path)
    assert [len(ds.split(s)) for s in SPLITS] == [546, 78, 156]
    assert ds.channels == 1 and ds.num_classes == 2
    assert np.bincount(ds.train.labels).tolist() == [147, 399]
    np.testing.assert_array_equal(ds.val.load(0)[:, :, 0], first)


# ---------------------------------------------------------------- class folders

def _png(path: Path, value: int, size: int = 6) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = value, 255 - value, (value * 7) % 256
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(path)
    return rgb


def _flat_folder(root: Path, per_class=(20, 10, 30)) -> dict[str, np.ndarray]:
    written = {}
    for c, n in zip(("ADI", "BACK", "TUM"), per_class):
        for i in range(n):
            rel = f"{c}/img{i:03d}.png"
            written[rel] = _png(root / rel, (i * 11 + len(c)) % 256)
    return written


def test_folder_flat_gets_a_seeded_stratified_split(tmp_path):
    written = _flat_folder(tmp_path / "tiles")
    (tmp_path / "tiles" / "ADI" / "notes.txt").write_text("not an image")
    ds = open_dataset(tmp_path / "tiles", seed=3, val_fraction=0.1, test_fraction=0.2)
    assert detect_format(tmp_path / "tiles") == "folder"
    assert ds.classes == ["ADI", "BACK", "TUM"] and ds.split_origin == "seeded"
    assert ds.channels == 3 and ds.image_size is None
    # ids are positions in the sorted (class, file) list
    keys = {ds.split(s).keys[i]: int(ds.split(s).ids[i]) for s in SPLITS for i in range(len(ds.split(s)))}
    assert keys == {k: n for n, k in enumerate(sorted(written))}
    assert [len(ds.split(s)) for s in SPLITS] == [42, 6, 12]
    # stratified: each split holds the classes in the pool's 2:1:3 proportion
    assert np.bincount(ds.test.labels).tolist() == [4, 2, 6]
    assert np.bincount(ds.val.labels).tolist() == [2, 1, 3]
    for s in SPLITS:
        part = ds.split(s)
        image, label, _ = part[len(part) // 2]
        np.testing.assert_array_equal(image, written[part.keys[len(part) // 2]])
        assert ds.classes[label] == part.keys[len(part) // 2].split("/")[0]


def test_seeded_split_is_deterministic_and_record_round_trips(tmp_path):
    _flat_folder(tmp_path / "tiles")
    a = open_dataset(tmp_path / "tiles", seed=5)
    b = open_dataset(tmp_path / "tiles", seed=5)
    c = open_dataset(tmp_path / "tiles", seed=6)
    assert a.split_record() == b.split_record()
    assert a.split_record()["ids"] != c.split_record()["ids"]
    record = a.split_record()
    assert record["origin"] == "seeded" and record["counts"] == {"train": 42, "val": 6, "test": 12}
    rebuilt = apply_split_record(c, record)
    assert rebuilt.split_record() == record
    np.testing.assert_array_equal(rebuilt.val.load(2), a.val.load(2))
    assert sorted(_all_ids(a).tolist()) == list(range(60))


def test_folder_with_split_layout_keeps_its_splits(tmp_path):
    root = tmp_path / "nct"
    counts = {"train": (5, 4), "val": (2, 1), "test": (3, 3)}
    written = {}
    for s, per_class in counts.items():
        for c, n in zip(("NORM", "STR"), per_class):
            for i in range(n):
                written[f"{s}/{c}/{i}.PNG"] = _png(root / s / c / f"{i}.PNG", 10 * i + len(c))
    ds = open_dataset(root)
    assert ds.split_origin == "file" and ds.classes == ["NORM", "STR"]
    assert [len(ds.split(s)) for s in SPLITS] == [9, 3, 6]
    assert _all_ids(ds).tolist() == list(range(18))
    assert ds.val.keys == ["val/NORM/0.PNG", "val/NORM/1.PNG", "val/STR/0.PNG"]
    assert ds.val.labels.tolist() == [0, 0, 1]
    np.testing.assert_array_equal(ds.test.load(4), written[ds.test.keys[4]])
    assert apply_split_record(ds, ds.split_record()).split_record() == ds.split_record()


def test_folder_images_reach_torch_without_a_library_warning(tmp_path, recwarn):
    """Decoded images are writable arrays, so torchvision's "NumPy array is not writable" warning
    (about nil's internals, not the user's input) never reaches the terminal."""
    from nil.data.transforms import make_transform

    _flat_folder(tmp_path / "tiles", per_class=(2, 2, 2))
    ds = open_dataset(tmp_path / "tiles")
    image = ds.train.load(0)
    assert image.flags.writeable
    make_transform(train=True, image_size=16, channels=3)(image)
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_folder_corrupt_image_is_named(tmp_path):
    _flat_folder(tmp_path / "tiles", per_class=(4, 4, 4))
    bad = tmp_path / "tiles" / "BACK" / "img002.png"
    bad.write_bytes(b"\x89PNG not really")
    ds = open_dataset(tmp_path / "tiles")
    split, i = next((s, i) for s in SPLITS for i, k in enumerate(ds.split(s).keys)
                    if k == "BACK/img002.png")
    with pytest.raises(NilError, match="img002.png"):
        ds.split(split).load(i)


def test_folder_empty_class_is_named(tmp_path):
    _flat_folder(tmp_path / "tiles", per_class=(4, 4, 4))
    (tmp_path / "tiles" / "MUC").mkdir()
    with pytest.raises(NilError, match="MUC"):
        open_dataset(tmp_path / "tiles")


def test_folder_class_missing_from_train_is_named(tmp_path):
    root = tmp_path / "nct"
    for s in SPLITS:
        for i in range(3):
            _png(root / s / "NORM" / f"{i}.png", i)
        _png(root / s / "DEB" / "0.png", 9)
    for s in ("val", "test"):
        _png(root / s / "LYM" / "0.png", 3)
    with pytest.raises(NilError, match="LYM.*no training samples"):
        open_dataset(root)


def test_tiny_class_falls_back_to_unstratified_split(tmp_path, caplog):
    _flat_folder(tmp_path / "tiles", per_class=(20, 1, 20))
    with caplog.at_level(logging.WARNING, logger="nil.data.splits"):
        ds = open_dataset(tmp_path / "tiles", seed=1)
    assert "unstratified" in caplog.text
    assert sum(len(ds.split(s)) for s in SPLITS) == 41


# ---------------------------------------------------------------- CSV manifests

def test_csv_aptos_style(tmp_path):
    root = tmp_path / "aptos"
    grades = np.arange(40) % 5
    written = {}
    for i, g in enumerate(grades):
        written[f"id{i:04x}"] = _png(root / "train_images" / f"id{i:04x}.png", 6 * i)
    pd.DataFrame({"id_code": list(written), "diagnosis": grades}).to_csv(root / "train.csv", index=False)
    ds = open_dataset(root / "train.csv", csv=CsvOptions(image_root=str(root / "train_images")),
                      seed=2, val_fraction=0.25, test_fraction=0.25)
    assert detect_format(root / "train.csv") == "csv"
    assert ds.format == "csv" and ds.split_origin == "seeded"
    assert ds.classes == ["0", "1", "2", "3", "4"]
    assert [len(ds.split(s)) for s in SPLITS] == [20, 10, 10]
    for s in SPLITS:
        assert np.bincount(ds.split(s).labels, minlength=5).tolist() == [len(ds.split(s)) // 5] * 5
        i = len(ds.split(s)) - 1
        image, label, sid = ds.split(s)[i]
        assert label == grades[sid] and ds.split(s).keys[i] == f"id{sid:04x}"
        np.testing.assert_array_equal(image, written[f"id{sid:04x}"])


def test_csv_finds_images_folder_and_suffix(tmp_path):
    names = [f"p{i}" for i in range(12)]
    for i, n in enumerate(names):
        _png(tmp_path / "images" / f"{n}.jpg".replace(".jpg", ".png"), i)
    pd.DataFrame({"filename": names, "label": ["benign", "malignant", "normal"] * 4}).to_csv(
        tmp_path / "m.csv", index=False)
    ds = open_dataset(tmp_path / "m.csv", test_fraction=0.25)
    assert ds.classes == ["benign", "malignant", "normal"]
    assert ds.info["suffix"] == ".png" and ds.info["image_root"] == str(tmp_path / "images")
    assert ds.train.load(0).shape == (6, 6, 3)


def _isic(tmp_path: Path, n: int = 28) -> tuple[Path, pd.DataFrame]:
    cols = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    onehot = np.eye(7)[np.arange(n) % 7]
    df = pd.DataFrame(onehot, columns=cols)
    df.insert(0, "image", [f"ISIC_{i:07d}" for i in range(n)])
    for i, name in enumerate(df["image"]):
        _png(tmp_path / "img" / f"{name}.jpg", 9 * i)  # PNG bytes, .jpg name: PIL reads content
    df.to_csv(tmp_path / "gt.csv", index=False)
    return tmp_path / "gt.csv", df


def test_csv_isic_onehot(tmp_path):
    path, df = _isic(tmp_path)
    ds = open_dataset(path, csv=CsvOptions(image_root=str(tmp_path / "img")), test_fraction=0.25)
    assert ds.classes == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    assert ds.info["suffix"] == ".jpg"
    for s in SPLITS:
        part = ds.split(s)
        for i in range(len(part)):
            assert part.labels[i] == part.ids[i] % 7 and part.keys[i] == df["image"][part.ids[i]]
    assert np.bincount(ds.test.labels).tolist() == [1] * 7


def test_csv_onehot_row_not_summing_to_one(tmp_path):
    path, df = _isic(tmp_path)
    df.loc[5, "MEL"] = 1.0  # row 5 is NV: now two classes
    df.to_csv(path, index=False)
    with pytest.raises(NilError, match="not summing to 1.*row 5"):
        open_dataset(path, csv=CsvOptions(image_root=str(tmp_path / "img"),
                                          label_cols=["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]))


def test_csv_missing_column_and_missing_files(tmp_path):
    path, df = _isic(tmp_path)
    opts = CsvOptions(image_root=str(tmp_path / "img"))
    with pytest.raises(NilError, match="'lesion'"):
        open_dataset(path, csv=CsvOptions(path_col="lesion", image_root=opts.image_root))
    with pytest.raises(NilError, match="'grade'"):
        open_dataset(path, csv=CsvOptions(label_col="grade", image_root=opts.image_root))
    (tmp_path / "img" / "ISIC_0000003.jpg").unlink()
    (tmp_path / "img" / "ISIC_0000011.jpg").unlink()
    with pytest.raises(NilError, match="2 image files missing.*ISIC_0000003.jpg"):
        open_dataset(path, csv=opts)


def test_csv_label_out_of_range(tmp_path):
    for i in range(10):
        _png(tmp_path / f"{i}.png", i)
    pd.DataFrame({"path": [f"{i}.png" for i in range(10)], "label": [0, 1] * 4 + [1, -1]}).to_csv(
        tmp_path / "m.csv", index=False)
    with pytest.raises(NilError, match="label -1 outside"):
        open_dataset(tmp_path / "m.csv")


# ---------------------------------------------------------------- zarr stores

def _zarr(path: Path, n: int = 50, chunk: int = 8, keys: bool = True, ids: bool = True,
          classes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 5, 5, 3), dtype=np.uint8)
    labels = np.arange(n) % 3
    g = zarr.open_group(str(path), mode="w")
    create = getattr(g, "create_array", None) or g.create_dataset
    create("images", shape=images.shape, chunks=(chunk, 5, 5, 3), dtype="uint8")[:] = images
    create("labels", shape=(n,), dtype="int64")[:] = labels
    if keys:
        create("keys", shape=(n,), dtype=str)[:] = np.array([f"slide1/{i}" for i in range(n)])
    if ids:
        create("ids", shape=(n,), dtype="int64")[:] = 1000 + np.arange(n)
    if classes:
        g.attrs["classes"] = classes
    return images, labels


def test_zarr_store_reads_through_the_chunk_cache(tmp_path):
    images, labels = _zarr(tmp_path / "p.zarr", classes=["a", "b", "c"])
    ds = open_dataset(tmp_path / "p.zarr", seed=0)
    assert detect_format(tmp_path / "p.zarr") == "zarr"
    assert ds.classes == ["a", "b", "c"] and ds.channels == 3 and ds.image_size == 5
    assert ds.train.chunk_size() == 8 and ds.split_origin == "seeded"
    pool = ds.train.parent
    assert isinstance(pool, ZarrSampleSet)
    for i in range(50):  # in order: one decode per chunk
        np.testing.assert_array_equal(pool.load(i), images[i])
    assert pool.decodes == 7
    pool.load(3)  # all 7 chunks fit in the 8-chunk cache
    assert pool.decodes == 7
    for s in SPLITS:
        part = ds.split(s)
        for i in range(len(part)):
            j = int(part.ids[i]) - 1000
            assert part.keys[i] == f"slide1/{j}" and part.labels[i] == labels[j]
        np.testing.assert_array_equal(part.load(0), images[int(part.ids[0]) - 1000])


def test_zarr_cache_is_bounded_and_pickles(tmp_path):
    import pickle

    images, _ = _zarr(tmp_path / "p.zarr", n=100, chunk=4, keys=False, ids=False)
    ds = open_dataset(tmp_path / "p.zarr")
    pool = ds.train.parent
    for i in range(0, 100, 4):
        pool.load(i)
    assert pool.decodes == 25 and len(pool._cache) == 8
    pool.load(0)  # evicted long ago
    assert pool.decodes == 26
    clone = pickle.loads(pickle.dumps(pool))
    np.testing.assert_array_equal(clone.load(97), images[97])
    assert ds.classes == ["0", "1", "2"] and ds.train.keys[0] == str(ds.train.ids[0])


def test_zarr_scattered_reads_decode_each_chunk_once_in_their_own_cache(tmp_path):
    """Mined distractors are scattered rows: read grouped by chunk, through a separate, larger cache."""
    from nil.mining import DistractorImages

    images, labels = _zarr(tmp_path / "p.zarr", n=100, chunk=4)
    ds = open_dataset(tmp_path / "p.zarr", seed=0)
    pool = ds.train.parent
    rows = np.random.default_rng(0).permutation(len(ds.train))[:40]
    rows = np.concatenate([rows, rows[:5]])  # repeats and no order
    want = [ds.train.load(int(r)) for r in rows]
    before = pool.decodes
    chunks = len(np.unique(ds.train.index[rows] // 4))
    assert chunks > 8  # more chunks than the loader's cache holds: per-image reads would thrash
    for got, image in zip(ds.train.load_many(rows), want):
        np.testing.assert_array_equal(got, image)
    assert pool.decodes - before <= chunks

    reader = ds.train.random_reader(cache_bytes=25 * 4 * 5 * 5 * 3)  # room for all 25 chunks
    assert reader.parent is not pool and reader.parent.cache_chunks == 25 and pool.cache_chunks == 8
    loader_decodes = pool.decodes
    reader.load_many(rows)
    first = reader.parent.decodes
    assert first == chunks
    reader.load_many(rows)
    assert reader.parent.decodes == first and pool.decodes == loader_decodes  # cached; loader's cache untouched
    assert ds.train.random_reader(cache_bytes=0).parent.cache_chunks == 8  # never below the loader's
    with pytest.raises(IndexError):
        pool.load_many(np.array([0, 100]))

    distractors = DistractorImages(ds.train, lambda image: torch.from_numpy(image.copy()).permute(2, 0, 1))
    x, y = distractors.load(torch.as_tensor(rows[:6]), torch.device("cpu"))
    assert x.shape == (6, 3, 5, 5) and y.tolist() == [int(ds.train.labels[r]) for r in rows[:6]]
    for k, r in enumerate(rows[:6]):
        np.testing.assert_array_equal(x[k].permute(1, 2, 0).numpy(), images[int(ds.train.ids[r]) - 1000])


def test_zarr_detected_without_suffix_and_wrong_shapes(tmp_path):
    _zarr(tmp_path / "store")
    assert detect_format(tmp_path / "store") == "zarr"
    g = zarr.open_group(str(tmp_path / "bad.zarr"), mode="w")
    create = getattr(g, "create_array", None) or g.create_dataset
    create("images", shape=(4, 5, 5), dtype="uint8")
    create("labels", shape=(4,), dtype="int64")
    with pytest.raises(NilError, match="images must have shape"):
        open_dataset(tmp_path / "bad.zarr")
    g = zarr.open_group(str(tmp_path / "bad2.zarr"), mode="w")
    create = getattr(g, "create_array", None) or g.create_dataset
    create("images", shape=(4, 5, 5, 3), dtype="uint8")
    create("labels", shape=(5,), dtype="int64")
    with pytest.raises(NilError, match="labels must have shape"):
        open_dataset(tmp_path / "bad2.zarr")


def test_zarr_duplicated_ids(tmp_path):
    _zarr(tmp_path / "p.zarr", ids=False)
    g = zarr.open_group(str(tmp_path / "p.zarr"), mode="a")
    create = getattr(g, "create_array", None) or g.create_dataset
    create("ids", shape=(50,), dtype="int64")[:] = np.arange(50) % 40
    with pytest.raises(NilError, match="duplicated sample ids"):
        open_dataset(tmp_path / "p.zarr")


def test_zarr_class_without_samples(tmp_path):
    _zarr(tmp_path / "p.zarr", classes=["a", "b", "c", "rare"])
    with pytest.raises(NilError, match="'rare' has no training samples"):
        open_dataset(tmp_path / "p.zarr")


# ---------------------------------------------------------------- detection, options, splits

def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(NilError, match="does not exist"):
        open_dataset(tmp_path / "nope.npz")
    (tmp_path / "scan.dcm").write_bytes(b"x")
    with pytest.raises(NilError, match="scan.dcm.*medmnist, folder, csv, zarr"):
        open_dataset(tmp_path / "scan.dcm")
    with pytest.raises(NilError, match="unknown data format 'hdf5'"):
        open_dataset(tmp_path / "scan.dcm", "hdf5")
    assert FORMATS == ("medmnist", "folder", "csv", "zarr")


def test_bad_fractions(tmp_path):
    _npz(tmp_path / "m.npz", rgb=True, flat_labels=True)
    with pytest.raises(NilError, match="val_fraction"):
        open_dataset(tmp_path / "m.npz", val_fraction=0.5, test_fraction=0.5)


def test_seeded_split_partitions_and_stratifies():
    labels = np.repeat([0, 1, 2, 3], [400, 300, 200, 100])
    parts = seeded_split(labels, seed=0, val_fraction=0.1, test_fraction=0.2)
    joined = np.sort(np.concatenate(list(parts.values())))
    np.testing.assert_array_equal(joined, np.arange(1000))
    assert [len(parts[s]) for s in SPLITS] == [700, 100, 200]
    assert np.bincount(labels[parts["test"]]).tolist() == [80, 60, 40, 20]
    assert np.bincount(labels[parts["val"]]).tolist() == [40, 30, 20, 10]
    again = seeded_split(labels, seed=0, val_fraction=0.1, test_fraction=0.2)
    assert all(np.array_equal(parts[s], again[s]) for s in SPLITS)
    assert len(seeded_split(labels, 0, 0.0, 0.2)["val"]) == 0
