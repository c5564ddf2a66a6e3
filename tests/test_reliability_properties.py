"""Property tests (hypothesis): the engine against a brute-force model, the CSV reader against random manifests."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import faiss_index
from nil.data.csv_manifest import CsvOptions, read_csv_manifest
from nil.errors import NilError

DIM, CLASSES = 4, 3
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# An op: ("upsert", ids, labels, seed) or ("search", labels, k, seed, same_class)
ids_st = st.lists(st.integers(0, 30), min_size=1, max_size=8)
upsert_st = ids_st.flatmap(lambda ids: st.tuples(st.just("upsert"), st.just(ids),
                                                 st.lists(st.integers(0, CLASSES - 1), min_size=len(ids),
                                                          max_size=len(ids)), st.integers(0, 10**6)))
search_st = st.tuples(st.just("search"), st.lists(st.integers(0, CLASSES - 1), min_size=1, max_size=4),
                      st.integers(1, 4), st.integers(0, 10**6), st.booleans())


def brute_force(model: dict, q: torch.Tensor, qy: int, qid: int, k: int, same: bool) -> list[tuple[float, int]]:
    """(distance, id) of the k nearest stored samples of another (or the same) class, never qid itself."""
    rows = [(float(torch.linalg.vector_norm(q - v)), i) for i, (v, y) in model.items()
            if (y == qy) == same and i != qid]
    return sorted(rows)[:k]


@pytest.mark.parametrize("kind", ["exact", "flat", "ivf"])
@SETTINGS
@given(ops=st.lists(st.one_of(upsert_st, search_st), min_size=1, max_size=25))
def test_random_upserts_and_searches_match_a_brute_force_model(kind, ops):
    if kind != "exact":
        pytest.importorskip("faiss")
    params = {"nlist": 2, "nprobe": 2} if kind == "ivf" else {}
    index = faiss_index.make_index(kind, DIM, CLASSES, refresh_every=3, **params)
    model: dict[int, tuple[torch.Tensor, int]] = {}
    for op in ops:
        if op[0] == "upsert":
            _, ids, labels, seed = op
            x = torch.randn(len(ids), DIM, generator=torch.Generator().manual_seed(seed))
            index.upsert(torch.tensor(ids), x, torch.tensor(labels))
            for i, v, y in zip(ids, x, labels):  # within a call the last duplicate wins
                model[i] = (v, y)
            assert len(index) == len(model)
            continue
        _, labels, k, seed, same = op
        q = torch.randn(len(labels), DIM, generator=torch.Generator().manual_seed(seed))
        qid = torch.randint(0, 31, (len(labels),), generator=torch.Generator().manual_seed(seed + 1))
        search = index.search_same_class if same else index.search_other_class
        res = search(q, torch.tensor(labels), k, query_ids=qid, return_vectors=True)
        for r in range(len(labels)):
            want = brute_force(model, q[r], labels[r], int(qid[r]), k, same)
            got_ids = [int(i) for i in res.ids[r] if i >= 0]
            if kind == "ivf":  # approximate: every answer is a true candidate at its true distance
                assert len(got_ids) <= len(want) and set(got_ids) <= {i for i, _ in model.items()}
            else:
                assert len(got_ids) == len(want)
                np.testing.assert_allclose(res.distances[r, :len(want)].numpy(), [d for d, _ in want],
                                           rtol=1e-4, atol=1e-4)
            for j, i in enumerate(got_ids):
                v, y = model[i]
                assert (y == labels[r]) == same and i != int(qid[r])
                assert int(res.labels[r, j]) == y and torch.allclose(res.vectors[r, j], v)
                assert float(res.distances[r, j]) == pytest.approx(float(torch.linalg.vector_norm(q[r] - v)),
                                                                   rel=1e-4, abs=1e-4)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("csvimgs")
    for i in range(8):
        Image.fromarray(np.full((4, 4, 3), i * 20, np.uint8)).save(root / f"im{i}.png")
    return root


column_st = st.sampled_from(["path", "image", "label", "diagnosis", "extra", "MEL", "NV", "notes"])


@SETTINGS
@given(columns=st.lists(column_st, min_size=0, max_size=5, unique=True),
       rows=st.integers(0, 8), seed=st.integers(0, 10**6),
       holes=st.booleans())
def test_random_csv_manifests_are_read_or_refused_in_one_sentence(image_dir, columns, rows, seed, holes):
    rng = np.random.default_rng(seed)
    cells = {}
    for c in columns:
        if c in ("path", "image"):
            cells[c] = [f"im{rng.integers(0, 8)}.png" for _ in range(rows)]
        elif c in ("MEL", "NV"):
            cells[c] = [str(rng.integers(0, 2)) for _ in range(rows)]
        elif c in ("label", "diagnosis"):
            cells[c] = [str(rng.integers(0, 3)) for _ in range(rows)]
        else:
            cells[c] = [rng.choice(["x", "", "3.5", "a,b"]) for _ in range(rows)]
        if holes and rows:
            cells[c][int(rng.integers(0, rows))] = ""
    quote = lambda s: f'"{s}"' if "," in s else s  # noqa: E731
    text = ",".join(columns) + "\n" + "".join(",".join(quote(cells[c][r]) for c in columns) + "\n"
                                             for r in range(rows))
    with tempfile.TemporaryDirectory(dir=image_dir) as tmp:
        path = Path(tmp) / "manifest.csv"
        path.write_text(text)
        try:
            ds = read_csv_manifest(path, CsvOptions(image_root=str(image_dir)), val_fraction=0.0, test_fraction=0.0)
        except NilError as err:
            assert str(err) and "\n" not in str(err).strip()
            return
    # Read: one sample per row, every label one of the classes, ids unique.
    assert len(ds.train) == rows
    assert ((ds.train.labels >= 0) & (ds.train.labels < len(ds.classes))).all()
    assert len(np.unique(ds.train.ids)) == rows
    path_col = next(c for c in ("path", "image") if c in columns)
    assert sorted(ds.train.keys) == sorted(cells[path_col])
