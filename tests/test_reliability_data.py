"""Hostile data is refused before training, naming the problem; --on-bad-image skip lists what it left out."""

import json

import numpy as np
import pytest
import zarr
from PIL import Image

from nil.config import TrainConfig
from nil.data import open_dataset
from nil.data.screen import screen_images
from nil.errors import NilError
from nil.train import train


def image_folder(root, n_per_class=12, bad=()):
    """Two classes of 8x8 PNGs; the files named in ``bad`` are truncated to half their bytes."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            path = root / c / f"{i:02d}.png"
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
            if f"{c}/{path.name}" in bad:
                path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return root


def quick(data, out, **kw):
    return TrainConfig(**(dict(data=str(data), out=str(out), model="small_cnn", epochs=1, batch_size=8,
                               embed_dim=8, progress=False, device="cpu", val_fraction=0.25,
                               test_fraction=0.25) | kw))


def test_bad_image_fails_before_training_naming_the_file(tmp_path):
    data = image_folder(tmp_path / "imgs", bad=("b/03.png",))
    with pytest.raises(NilError, match=r"cannot read image .*b/03\.png.*1 of 24.*--on-bad-image skip"):
        train(quick(data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_skip_lists_every_bad_image_in_the_run_folder_and_counts_it(tmp_path):
    data = image_folder(tmp_path / "imgs", bad=("a/00.png", "b/07.png"))
    result = train(quick(data, tmp_path / "run", on_bad_image="skip"))
    skipped = json.loads((tmp_path / "run" / "skipped_images.json").read_text())
    assert sorted(s["key"] for s in skipped) == ["a/00.png", "b/07.png"]
    assert result["skipped_images"] == 2
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped_images"] == 2
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    kept = {i for ids in splits["ids"].values() for i in ids}
    assert len(kept) == 22 and not kept & {s["id"] for s in skipped}


def test_screen_leaves_a_sound_dataset_untouched(tmp_path):
    ds = open_dataset(image_folder(tmp_path / "imgs"))
    assert screen_images(ds, "skip") is ds


def test_skipping_every_image_of_a_class_is_refused(tmp_path):
    data = image_folder(tmp_path / "imgs", n_per_class=3, bad=("b/00.png", "b/01.png", "b/02.png"))
    with pytest.raises(NilError, match="class 'b' has no training samples|needs at least"):
        train(quick(data, tmp_path / "run", on_bad_image="skip", val_fraction=0.0, test_fraction=0.0))
    assert not (tmp_path / "run").exists()


def zarr_store(path, labels, ids=None, classes=None):
    g = zarr.open_group(str(path), mode="w")
    n = len(labels)
    g.create_array("images", data=np.zeros((n, 8, 8, 3), np.uint8), chunks=(n, 8, 8, 3))
    g.create_array("labels", data=np.asarray(labels, np.int64))
    if ids is not None:
        g.create_array("ids", data=np.asarray(ids, np.int64))
    if classes is not None:
        g.attrs["classes"] = classes
    return path


def test_label_outside_the_class_list_is_refused_before_training(tmp_path):
    data = zarr_store(tmp_path / "d.zarr", [0, 1, 2] * 10, classes=["x", "y"])
    with pytest.raises(NilError, match="label 2 outside 0..1"):
        train(quick(data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_duplicated_sample_ids_are_refused_before_training(tmp_path):
    ids = list(range(29)) + [3]
    data = zarr_store(tmp_path / "d.zarr", [0, 1] * 15, ids=ids)
    with pytest.raises(NilError, match=r"duplicated sample ids, e.g. \[3\]"):
        train(quick(data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_csv_label_outside_the_classes_is_refused(tmp_path):
    image_folder(tmp_path / "imgs")
    rows = [f"a/{i:02d}.png,{-1 if i == 4 else i % 2}" for i in range(12)]
    (tmp_path / "imgs" / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(NilError, match="label -1 outside"):
        open_dataset(tmp_path / "imgs" / "m.csv")
