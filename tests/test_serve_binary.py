"""The service's binary format (``application/x-npy``): the same answers as JSON, and every bad body a 4xx.

In process (starlette's TestClient drives the ASGI app), so the whole module takes seconds;
tests/test_serve.py drives ``Client(binary=True)`` against the real uvicorn process.
"""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import faiss_index
from faiss_index import npy_stream
from faiss_index.service import ServiceLimits, create_app

pytest.importorskip("fastapi.testclient")
from fastapi.testclient import TestClient

TOKEN = "binary-token"
DIM, CLASSES, N = 8, 3, 30
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NPY = {**AUTH, "Content-Type": npy_stream.MEDIA_TYPE}
LIMITS = ServiceLimits(max_batch=16, max_k=25, max_body_bytes=64 << 10, search_threads=2)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("binary")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, DIM, generator=g), torch.arange(N) % CLASSES
    index = faiss_index.make_index("exact", DIM, CLASSES)
    index.upsert(torch.arange(N) * 5 + 1, x, y)
    faiss_index.save_index(index, root / "idx", classes=["a", "b", "c"], keys=[f"patch/{i}.png" for i in range(N)])
    reference, manifest = faiss_index.load_index(root / "idx")
    served, _ = faiss_index.load_index(root / "idx")
    app = create_app(served, manifest, root / "idx", keys=faiss_index.stored_keys(root / "idx", N), token=TOKEN,
                     limits=LIMITS)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, reference, served


def _queries(q: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(q, DIM)).astype(np.float32), rng.integers(0, CLASSES, size=q)


def _search_npy(client, *arrays, k: int | str = 5, headers=NPY, accept: str | None = npy_stream.MEDIA_TYPE):
    headers = {**headers, **({"Accept": accept} if accept else {})}
    return client.post(f"/v1/search?k={k}", content=npy_stream.dumps(*arrays), headers=headers)


# ---------------------------------------------------------------------------------------- same answers
@pytest.mark.parametrize("k", [1, 5, 25])  # k = 25 > the 20 samples of other classes: missing neighbours
def test_binary_and_json_answers_are_identical(service, k):
    client, reference, _ = service
    xq, yq = _queries(12)
    r_json = client.post("/v1/search", json={"vectors": xq.tolist(), "labels": yq.tolist(), "k": k}, headers=AUTH)
    r_npy = _search_npy(client, xq, yq, k=k)
    assert r_json.status_code == r_npy.status_code == 200, (r_json.text, r_npy.text)
    assert r_npy.headers["content-type"] == npy_stream.MEDIA_TYPE
    assert r_npy.headers["x-arrays"] == "ids,labels,distances,keys"
    got = npy_stream.loads(r_npy.content, npy_stream.ANSWER_ARRAYS)
    out = r_json.json()
    assert got["ids"].dtype == np.int64 and got["labels"].dtype == np.int64 and got["distances"].dtype == np.float32
    assert got["ids"].shape == (12, k) and got["keys"].shape == (12, k)
    assert got["ids"].tolist() == out["ids"] and got["labels"].tolist() == out["labels"]
    assert got["keys"].tolist() == out["keys"]
    json_dist = [[math.inf if d is None else d for d in row] for row in out["distances"]]
    np.testing.assert_array_equal(got["distances"], np.array(json_dist, dtype=np.float32))
    # and both equal the exact engine searched in process
    ref = reference.search_other_class(torch.from_numpy(xq), torch.from_numpy(yq), k)
    np.testing.assert_array_equal(got["ids"], ref.ids.numpy())
    np.testing.assert_allclose(got["distances"], ref.distances.numpy(), rtol=1e-6, atol=1e-6)
    assert (got["ids"] == -1).any() == (k == 25) and np.isinf(got["distances"][got["ids"] == -1]).all()
    assert all(key == "" for key in got["keys"][got["ids"] == -1])


def test_formats_mix_freely(service):
    """A JSON request can ask for arrays, arrays can be answered as JSON; labels of any integer width."""
    client, _, _ = service
    xq, yq = _queries(3, seed=2)
    base = client.post("/v1/search", json={"vectors": xq.tolist(), "labels": yq.tolist(), "k": 4}, headers=AUTH).json()
    r = client.post("/v1/search", json={"vectors": xq.tolist(), "labels": yq.tolist(), "k": 4},
                    headers={**AUTH, "Accept": "application/x-npy;q=1, application/json;q=0.5"})
    assert npy_stream.loads(r.content, npy_stream.ANSWER_ARRAYS)["ids"].tolist() == base["ids"]
    for labels in (yq.astype(np.uint8), yq.astype(np.int16), yq.astype(">i8")):
        r = _search_npy(client, xq.astype(">f4"), labels, k=4, accept=None)
        assert r.status_code == 200 and r.json() == base, r.text


def test_binary_upsert_with_keys(service):
    client, reference, served = service
    ids = np.array([10_001, 10_002], dtype=np.int64)
    xb = np.full((2, DIM), 3.0, np.float32)
    xb[1] *= -1
    yb = np.array([2, 0])
    r = client.post("/v1/upsert", content=npy_stream.dumps(ids, xb, yb, np.array(["new/a.png", "new/b.png"])),
                    headers=NPY)
    assert r.status_code == 200 and r.json() == {"upserted": 2, "count": N + 2}, r.text
    reference.upsert(torch.from_numpy(ids), torch.from_numpy(xb), torch.from_numpy(yb))
    got = npy_stream.loads(_search_npy(client, xb, np.array([0, 2]), k=1).content, npy_stream.ANSWER_ARRAYS)
    assert got["ids"].tolist() == [[10_001], [10_002]] and got["keys"].tolist() == [["new/a.png"], ["new/b.png"]]
    # without keys, a known id keeps its key
    r = client.post("/v1/upsert", content=npy_stream.dumps(ids[:1], xb[:1] * 2, yb[:1]), headers=NPY)
    assert r.status_code == 200 and r.json()["count"] == len(served) == N + 2
    reference.upsert(torch.from_numpy(ids[:1]), torch.from_numpy(xb[:1] * 2), torch.from_numpy(yb[:1]))
    got = npy_stream.loads(_search_npy(client, xb[:1] * 2, np.array([0]), k=1).content, npy_stream.ANSWER_ARRAYS)
    assert got["keys"].tolist() == [["new/a.png"]]


# ---------------------------------------------------------------------------------------- bad bodies
def _npy(a) -> bytes:
    return npy_stream.dumps(a)


X1, Y1 = np.full((1, DIM), 0.5, np.float32), np.array([0])


def _pickled_objects() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, vectors=X1, labels=Y1)
    return buf.getvalue()


def _lying_header(shape: tuple) -> bytes:
    """A .npy array whose header claims ``shape`` but holds one row."""
    body = bytearray(_npy(X1))
    text = body[10:10 + int.from_bytes(body[8:10], "little")].decode()
    fake = text.replace(str((1, DIM)), str(shape)).encode().ljust(len(text))
    return bytes(body[:10] + fake[:len(text)] + body[10 + len(text):])


BAD_SEARCHES = [  # (id, body, k, status, field, words of the message)
    ("dimension", _npy(np.zeros((1, DIM - 1), np.float32)) + _npy(Y1), 5, 422, "vectors", "dimension 7"),
    ("1-d vectors", _npy(np.zeros(DIM, np.float32)) + _npy(Y1), 5, 422, "vectors", "2-d"),
    ("3-d vectors", _npy(np.zeros((1, 1, DIM), np.float32)) + _npy(Y1), 5, 422, "vectors", "2-d"),
    ("float64", _npy(X1.astype(np.float64)) + _npy(Y1), 5, 422, "vectors", "float32, got float64"),
    ("float16", _npy(X1.astype(np.float16)) + _npy(Y1), 5, 422, "vectors", "float32"),
    ("int vectors", _npy(X1.astype(np.int32)) + _npy(Y1), 5, 422, "vectors", "float32"),
    ("structured", _npy(np.zeros(1, dtype=[("v", "<f4", (DIM,))])) + _npy(Y1), 5, 422, "vectors", "float32"),
    ("no rows", _npy(np.zeros((0, DIM), np.float32)) + _npy(Y1[:0]), 5, 422, "vectors", "empty"),
    ("NaN", _npy(np.where(np.arange(DIM) == 3, np.nan, X1).astype(np.float32)) + _npy(Y1), 5, 422, "vectors", "NaN"),
    ("inf", _npy(np.where(np.arange(DIM) == 0, -np.inf, X1).astype(np.float32)) + _npy(Y1), 5, 422, "vectors",
     "infinite"),
    ("float labels", _npy(X1) + _npy(Y1.astype(np.float32)), 5, 422, "labels", "integer"),
    ("bool labels", _npy(X1) + _npy(Y1.astype(bool)), 5, 422, "labels", "integer"),
    ("2-d labels", _npy(X1) + _npy(Y1[None]), 5, 422, "labels", "1-d"),
    ("label count", _npy(np.repeat(X1, 2, 0)) + _npy(Y1), 5, 422, "labels", "1 entries for 2 vectors"),
    ("unknown label", _npy(X1) + _npy(np.array([3])), 5, 422, "labels", "label 3 is unknown"),
    ("negative label", _npy(X1) + _npy(np.array([-1])), 5, 422, "labels", "label -1 is unknown"),
    ("huge label", _npy(X1) + _npy(np.array([2 ** 64 - 1], np.uint64)), 5, 422, "labels", "unknown"),
    ("batch", _npy(np.repeat(X1, 17, 0)) + _npy(np.zeros(17, np.int64)), 5, 413, None, "at most 16"),
    ("k over max", _npy(X1) + _npy(Y1), 26, 422, "k", "1..25"),
    ("k zero", _npy(X1) + _npy(Y1), 0, 422, "k", "1..25"),
    ("k not int", _npy(X1) + _npy(Y1), "five", 422, "k", "integer"),
    ("no labels", _npy(X1), 5, 422, "labels", "ends after vectors"),
    ("empty body", b"", 5, 422, "vectors", "body is empty"),
    ("extra array", _npy(X1) + _npy(Y1) + _npy(Y1), 5, 422, "body", "follow the last"),
    ("trailing bytes", _npy(X1) + _npy(Y1) + b"\x00", 5, 422, "body", "1 byte(s) follow"),
    ("truncated", (_npy(X1) + _npy(Y1))[:-4], 5, 422, "labels", "could not be read"),
    ("truncated header", _npy(X1)[:20], 5, 422, "vectors", "could not be read"),
    ("not npy", b"vectors=0.5,0.5", 5, 422, "vectors", "not in .npy format"),
    ("json", b'{"vectors": [[0.5]], "labels": [0]}', 5, 422, "vectors", "not in .npy format"),
    ("pickle", pickle.dumps(X1), 5, 422, "vectors", "not in .npy format"),
    ("object array", _pickled_objects() + _npy(Y1), 5, 422, "vectors", "never unpickles"),
    ("npz as npy", _npz(), 5, 422, "vectors", "not in .npy format but a zip (.npz) archive"),
    ("lying shape", _lying_header((10 ** 6, DIM)) + _npy(Y1), 5, 422, "vectors", "could not be read"),
    ("absurd shape", _lying_header((2 ** 60, DIM)) + _npy(Y1), 5, 422, "vectors", "could not be read"),
    ("corrupt header", _npy(X1).replace(b"'descr'", b"'dexcr'") + _npy(Y1), 5, 422, "vectors", "could not be read"),
]


@pytest.mark.parametrize("body,k,status,field,words", [c[1:] for c in BAD_SEARCHES], ids=[c[0] for c in BAD_SEARCHES])
def test_bad_binary_searches_get_one_clear_4xx(service, body, k, status, field, words):
    client, _, _ = service
    r = client.post(f"/v1/search?k={k}", content=body, headers={**NPY, "Accept": npy_stream.MEDIA_TYPE})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"  # errors are JSON whatever was asked for
    detail = r.json()["detail"]
    if field is None:
        assert words in detail
    else:
        assert len(detail) == 1 and detail[0]["loc"][-1] == field and words in detail[0]["msg"], detail


BAD_UPSERTS = [  # (id, arrays, field, words)
    ("negative id", (np.array([-1]), X1, Y1), "ids", "0.."),
    ("id beyond int64", (np.array([2 ** 63], np.uint64), X1, Y1), "ids", str(2 ** 63)),
    ("float ids", (np.array([1.0]), X1, Y1), "ids", "integer"),
    ("id count", (np.array([1, 2]), X1, Y1), "ids", "2 entries for 1 vectors"),
    ("float64 vectors", (np.array([1]), X1.astype(np.float64), Y1), "vectors", "float32"),
    ("NaN", (np.array([1]), np.full((1, DIM), np.nan, np.float32), Y1), "vectors", "NaN"),
    ("unknown label", (np.array([1]), X1, np.array([7])), "labels", "unknown"),
    ("int keys", (np.array([1]), X1, Y1, np.array([5])), "keys", "str"),
    ("key count", (np.array([1]), X1, Y1, np.array(["a", "b"])), "keys", "2 entries"),
    ("no labels", (np.array([1]), X1), "labels", "ends after ids, vectors"),
    ("extra", (np.array([1]), X1, Y1, np.array(["a"]), Y1), "body", "follow"),
]


@pytest.mark.parametrize("arrays,field,words", [c[1:] for c in BAD_UPSERTS], ids=[c[0] for c in BAD_UPSERTS])
def test_bad_binary_upserts_write_nothing(service, arrays, field, words):
    client, _, served = service
    before = len(served)
    r = client.post("/v1/upsert", content=npy_stream.dumps(*arrays), headers=NPY)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert len(detail) == 1 and detail[0]["loc"][-1] == field and words in detail[0]["msg"], detail
    assert len(served) == before


def test_npz_is_refused_with_the_format_to_use(service):
    client, _, _ = service
    for path in ("/v1/search", "/v1/upsert"):
        r = client.post(path, content=_npz(), headers={**AUTH, "Content-Type": "application/x-npz"})
        assert r.status_code == 415 and "application/x-npy" in r.json()["detail"]


def test_binary_requests_need_the_token(service):
    client, _, served = service
    before = len(served)
    body = npy_stream.dumps(X1, Y1)
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        headers = {**headers, "Content-Type": npy_stream.MEDIA_TYPE}
        assert client.post("/v1/search", content=body, headers=headers).status_code == 401
        r = client.post("/v1/upsert", content=npy_stream.dumps(np.array([3]), X1, Y1), headers=headers)
        assert r.status_code == 401
    assert len(served) == before


def test_body_limit_holds_for_arrays(service):
    client, _, _ = service
    big = np.zeros((LIMITS.max_body_bytes // (4 * DIM) + 1, DIM), np.float32)
    r = client.post("/v1/search", content=npy_stream.dumps(big, np.zeros(len(big), np.int64)), headers=NPY)
    assert r.status_code == 413 and "limit" in r.json()["detail"]


# ---------------------------------------------------------------------------------------- never a 5xx
dtypes = st.sampled_from(["<f4", ">f4", "<f8", "<f2", "<i8", "<u8", "|i1", "|b1", "<c8", "<U3", "|S2", "<M8[s]"])
shapes = st.lists(st.integers(0, 17), min_size=0, max_size=3).map(tuple)
arrays = st.builds(lambda d, s, seed: np.random.default_rng(seed).normal(size=s).astype(d) if np.dtype(d).kind != "U"
                   else np.full(s, "ab", dtype=d), dtypes, shapes, st.integers(0, 2 ** 16))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(arrays, max_size=4), k=st.integers(-1, 30), cut=st.integers(0, 40),
       path=st.sampled_from(["/v1/search", "/v1/upsert"]))
def test_random_arrays_never_5xx(service, parts, k, cut, path):
    client, _, served = service
    before = len(served)
    body = npy_stream.dumps(*parts)
    body = body[:len(body) - cut] if cut < 10 else body  # sometimes truncated
    r = client.post(f"{path}?k={k}", content=body, headers=NPY)
    assert r.status_code < 500, (r.status_code, r.text[:300])
    assert r.status_code == 200 or ("detail" in r.json() and len(served) == before)
