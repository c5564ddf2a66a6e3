"""`nil index serve` as a real uvicorn process on a free loopback port, driven over HTTP by the client."""

from __future__ import annotations

import io
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import faiss_index
from benchmarks.server import ServeProcess
from cli.main import main
from faiss_index import stored_keys
from faiss_index.client import Client, ServiceError
from faiss_index.synthetic import clustered

TOKEN = "serve-test-token"
DIM, CLASSES, N = 16, 3, 600


class Server(ServeProcess):
    """The service under test, with the test's token; ready when constructed."""

    def __init__(self, index_dir: Path, log: Path, *args: str, token: str | None = TOKEN):
        super().__init__(index_dir, log, *args, token=token, env={"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"})
        self.wait_ready(90)

    def client(self, token: str | None = TOKEN) -> Client:
        return Client(self.url, token=token)


def _make_checkpoint(path: Path) -> Path:
    from nil.models import build_model

    torch.manual_seed(0)
    model = build_model("small_cnn", CLASSES, 3, 16, DIM)
    spec = {"name": "small_cnn", "num_classes": CLASSES, "in_channels": 3, "image_size": 16, "embed_dim": DIM}
    torch.save({"model": model.state_dict(), "model_spec": spec}, path)
    return path


def _build_index(folder: Path, checkpoint: Path | None) -> None:
    from faiss_index import sha256_file

    extra = {"checkpoint": str(checkpoint)} if checkpoint else {"owner": "lab 3"}
    x, y = clustered(N, DIM, CLASSES, clusters_per_class=10, seed=0)
    # inplace off, refresh_every: upserts stay in the exact delta, so the tests' own neighbours are found exactly
    index = faiss_index.make_index("ivfpq", DIM, CLASSES, refresh_every=100_000, inplace=False)
    index.upsert(torch.arange(N) * 3 + 7, x, y)  # ids that are not row numbers
    index.build()
    faiss_index.save_index(index, folder, classes=["stroma", "muscle", "tumour"], keys=[f"slide/{i}" for i in range(N)],
                           checkpoint_sha256=sha256_file(checkpoint) if checkpoint else None, source="test",
                           extra=extra)


class Served:
    """The module's server plus an in-process copy of the same index that mirrors every upsert."""

    def __init__(self, root: Path):
        self.root = root
        self.checkpoint = _make_checkpoint(root / "model.pt")
        self.folder = root / "idx"
        _build_index(self.folder, self.checkpoint)
        self.reference, _ = faiss_index.load_index(self.folder)
        self.keys = dict(zip(self.reference.store.view()[2].tolist(), stored_keys(self.folder, N).tolist()))
        self.server = Server(self.folder, root / "server.log", "--max-batch", "64", "--max-body-mb", "0.25")
        self.client = self.server.client()

    def upsert(self, ids, vectors, labels, keys=None) -> dict:
        out = self.client.upsert(ids, vectors, labels, keys=keys)
        self.reference.upsert(torch.as_tensor(ids), torch.as_tensor(np.asarray(vectors, np.float32)),
                              torch.as_tensor(labels))
        self.keys.update(zip(ids, keys or [self.keys.get(i, "") for i in ids]))
        return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("serve"))
    yield s
    s.client.close()
    s.server.stop()


def _log_with(path: Path, text: str, timeout: float = 10) -> str:
    """The log once it holds text (a request's line is written just after its response is sent)."""
    deadline = time.monotonic() + timeout
    while text not in (log := path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return log


def _post(served, path: str, token: str | None = TOKEN, **kw) -> httpx.Response:
    headers = kw.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(served.server.url + path, headers=headers, timeout=30, **kw)


# ---------------------------------------------------------------------------------------- reads
def test_health_info_and_logs(served):
    assert served.client.healthz() == {"status": "ok", "index_loaded": True, "count": len(served.reference)}
    info = served.client.index_info()
    assert info["kind"] == "ivfpq" and info["dim"] == DIM and info["classes"] == ["stroma", "muscle", "tumour"]
    assert info["counts"] == served.reference.counts() and info["count"] == len(served.reference)
    assert info["image_search"] is True and info["writable"] is True and info["device"] == "cpu"
    log = _log_with(served.server.log, "GET /v1/index 200 ")
    assert "serving ivfpq index" in log and str(served.folder) in log and " on cpu " in log
    assert re.search(r"GET /v1/index 200 [0-9.]+ ms", log)


def test_search_equals_the_in_process_engine(served):
    x, y = clustered(40, DIM, CLASSES, clusters_per_class=10, seed=1)
    got = served.client.search(x, y, k=5)
    ref = served.reference.search_other_class(x, y, 5)
    np.testing.assert_array_equal(got.ids, ref.ids.numpy())
    np.testing.assert_array_equal(got.labels, ref.labels.numpy())
    np.testing.assert_allclose(got.distances, ref.distances.numpy(), rtol=1e-6, atol=1e-6)
    assert (got.labels != y.numpy()[:, None]).all()
    assert got.keys == [[served.keys[i] for i in row] for row in ref.ids.tolist()]


def test_binary_client_answers_like_json(served):
    x, y = clustered(40, DIM, CLASSES, clusters_per_class=10, seed=2)
    with served.server.client() as c, Client(served.server.url, token=TOKEN, binary=True) as b:
        for k in (1, 7):
            want, got = c.search(x, y, k=k), b.search(x, y, k=k)
            assert got.ids.dtype == np.int64 and got.distances.dtype == np.float32
            np.testing.assert_array_equal(got.ids, want.ids)
            np.testing.assert_array_equal(got.labels, want.labels)
            np.testing.assert_array_equal(got.distances, want.distances)
            assert got.keys == want.keys
        with pytest.raises(ServiceError) as e:
            b.search(x[:, :-1], y)
        assert e.value.status == 422 and e.value.fields == ["vectors"] and "dimension" in str(e.value)
        with pytest.raises(ServiceError) as e:
            b.search(x, y, k=101)
        assert e.value.status == 422 and e.value.fields == ["k"]
    with Client(served.server.url, token=None, binary=True) as anonymous, pytest.raises(ServiceError) as e:
        anonymous.search(x, y)
    assert e.value.status == 401


def test_image_search_embeds_with_the_index_checkpoint(served, tmp_path):
    from nil.indexing import embed_image

    image = tmp_path / "patch.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(image)
    z, predicted = embed_image(image, served.checkpoint, torch.device("cpu"))
    ref = served.reference.search_other_class(torch.as_tensor(z), torch.tensor([2]), 3)
    got = served.client.search_image(image, label=2, k=3)
    np.testing.assert_array_equal(got.ids, ref.ids.numpy())
    np.testing.assert_allclose(got.distances, ref.distances.numpy(), rtol=1e-5, atol=1e-5)
    assert got.query_labels.tolist() == [2]
    # no label: the model's prediction is the query's class
    got = served.client.search_image(image.read_bytes(), k=3)
    assert got.query_labels.tolist() == [predicted] and (got.labels != predicted).all()


# ---------------------------------------------------------------------------------------- bad inputs
def _vec(n=1, d=DIM, v=0.1):
    return [[v] * d for _ in range(n)]


BAD_JSON = [  # (path, body, status, offending field)
    ("/v1/search", {"vectors": _vec(d=DIM - 1), "labels": [0]}, 422, "vectors"),
    ("/v1/search", {"vectors": [[0.1] * DIM, [0.1] * 3], "labels": [0, 1]}, 422, "vectors"),
    ("/v1/search", {"vectors": [], "labels": []}, 422, "vectors"),
    ("/v1/search", {"vectors": [["a"] * DIM], "labels": [0]}, 422, "vectors"),
    ("/v1/search", {"vectors": [[1e39] * DIM], "labels": [0]}, 422, "vectors"),
    ("/v1/search", {"vectors": _vec(), "labels": [3]}, 422, "labels"),
    ("/v1/search", {"vectors": _vec(), "labels": [-1]}, 422, "labels"),
    ("/v1/search", {"vectors": _vec(), "labels": [True]}, 422, "labels"),
    ("/v1/search", {"vectors": _vec(2), "labels": [0]}, 422, "labels"),
    ("/v1/search", {"vectors": _vec(), "labels": [0], "k": 0}, 422, "k"),
    ("/v1/search", {"vectors": _vec(), "labels": [0], "k": 101}, 422, "k"),
    ("/v1/search", {"vectors": _vec(), "labels": [0], "k": "5"}, 422, "k"),
    ("/v1/search", {"vectors": _vec(), "labels": [0], "path": "/etc/passwd"}, 422, "path"),
    ("/v1/search", {"labels": [0]}, 422, "vectors"),
    ("/v1/search", {"vectors": _vec(65), "labels": [0] * 65}, 413, None),
    ("/v1/upsert", {"ids": [-1], "vectors": _vec(), "labels": [0]}, 422, "ids"),
    ("/v1/upsert", {"ids": [2 ** 63], "vectors": _vec(), "labels": [0]}, 422, "ids"),
    ("/v1/upsert", {"ids": [1, 2], "vectors": _vec(), "labels": [0]}, 422, "ids"),
    ("/v1/upsert", {"ids": [1], "vectors": _vec(), "labels": [0], "keys": ["a", "b"]}, 422, "keys"),
    ("/v1/upsert", {"ids": [1], "vectors": _vec(), "labels": [5]}, 422, "labels"),
    ("/v1/snapshot", {"path": "/tmp/elsewhere"}, 422, "path"),
]


@pytest.mark.parametrize("path,body,status,field", BAD_JSON, ids=[f"{p}-{f}-{s}" for p, _, s, f in BAD_JSON])
def test_bad_json_is_refused_with_its_field(served, path, body, status, field):
    r = _post(served, path, json=body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    if field is not None:
        assert any(field in e["loc"] for e in detail), detail
    assert served.client.healthz()["count"] == len(served.reference)  # nothing was written


@pytest.mark.parametrize("body,expected", [
    (b'{"vectors": [[NaN' + b", 0.1" * (DIM - 1) + b']], "labels": [0]}', "NaN"),
    (b'{"vectors": [[Infinity' + b", 0.1" * (DIM - 1) + b']], "labels": [0]}', "infinite"),
    (b'{"vectors": [[0.1, ', "JSON"),
    (b"[1, 2]", "object"),
    (b"", "JSON")])
def test_nan_and_malformed_bodies_are_422(served, body, expected):
    r = _post(served, "/v1/search", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and expected in r.json()["detail"][0]["msg"], r.text


def test_body_limits_by_length_and_by_stream(served):
    big = b'{"vectors": [' + b"0.1," * 100_000 + b'0.1]], "labels": [0]}'  # ~400 kB > 0.25 MB limit
    assert _post(served, "/v1/search", content=big, headers={"Content-Type": "application/json"}).status_code == 413

    def chunks():  # no Content-Length: chunked transfer, capped while it streams
        yield b'{"vectors": [['
        for _ in range(200):
            yield b"0.1," * 1000
        yield b'0.1]], "labels": [0]}'

    r = _post(served, "/v1/search", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert served.client.healthz()["status"] == "ok"


def test_bad_image_uploads_are_4xx(served, tmp_path):
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, format="PNG")
    cases = [({"file": ("x.png", b"not an image at all")}, {}, "file"),
             ({"file": ("../../escape.png", png.getvalue())}, {"label": "9"}, "label"),
             ({"file": ("x.png", png.getvalue())}, {"label": "one"}, "label"),
             ({"file": ("x.png", png.getvalue())}, {"k": "0"}, "k"),
             ({}, {"label": "1"}, "file")]
    for files, data, field in cases:
        r = _post(served, "/v1/search/image", files=files or None, data=data)
        assert r.status_code == 422 and any(field in e["loc"] for e in r.json()["detail"]), (field, r.text)
    assert not (tmp_path.parent / "escape.png").exists() and not (served.folder.parent / "escape.png").exists()


def test_tokens(served):
    assert httpx.get(served.server.url + "/healthz").status_code == 200
    assert httpx.get(served.server.url + "/openapi.json").json()["paths"].keys() >= {
        "/healthz", "/v1/index", "/v1/search", "/v1/search/image", "/v1/upsert", "/v1/snapshot"}
    body = {"vectors": _vec(), "labels": [0]}
    for token in (None, "wrong-token", TOKEN + "x"):
        with pytest.raises(ServiceError) as e:
            served.server.client(token).upsert([5], _vec(), [0])
        assert e.value.status == 401
        assert _post(served, "/v1/search", token=token, json=body).status_code == 401
        assert _post(served, "/v1/snapshot", token=token).status_code == 401
        assert httpx.get(served.server.url + "/v1/index",
                         headers={"Authorization": f"Bearer {token}"} if token else {}).status_code == 401
    assert served.client.healthz()["count"] == len(served.reference)


def test_bind_beyond_loopback_needs_a_token(tmp_path):
    runner = CliRunner(env={"NIL_TOKEN": None})
    r = runner.invoke(main, ["index", "serve", "--index", str(tmp_path), "--host", "0.0.0.0"])
    assert r.exit_code == 1 and "without a token" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["index", "serve", "--index", str(tmp_path / "none")])
    assert r.exit_code == 1 and "not an index folder" in r.output


def test_a_checkpoint_of_another_width_is_refused_before_serving(served, tmp_path):
    index = faiss_index.make_index("exact", 8, CLASSES)
    index.upsert(torch.arange(6), torch.randn(6, 8), torch.arange(6) % CLASSES)
    faiss_index.save_index(index, tmp_path / "idx8", classes=["a", "b", "c"])
    r = CliRunner(env={"NIL_TOKEN": None}).invoke(main, ["index", "serve", "--index", str(tmp_path / "idx8"),
                                                         "--checkpoint", str(served.checkpoint), "--device", "cpu"])
    assert r.exit_code == 1 and "16 dimensions" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------------------------------- writes
def test_upsert_is_visible_to_the_next_search(served):
    q = np.full((1, DIM), 0.25, np.float32)
    before = served.client.search(q, [0], k=1)
    assert before.distances[0, 0] > 0
    out = served.upsert([1_000_003], q, [2], keys=["new/patch.png"])
    assert out == {"upserted": 1, "count": len(served.reference)}
    hit = served.client.search(q, [0], k=1)
    assert hit.ids.tolist() == [[1_000_003]] and hit.labels.tolist() == [[2]] and hit.keys == [["new/patch.png"]]
    assert hit.distances[0, 0] == pytest.approx(0.0, abs=1e-6)
    # replacing the sample moves it; its key stays
    served.upsert([1_000_003], -q, [2])
    hit = served.client.search(-q, [1], k=1)
    assert hit.ids.tolist() == [[1_000_003]] and hit.keys == [["new/patch.png"]]
    assert served.client.index_info()["counts"] == served.reference.counts()


def test_binary_upsert_is_visible_to_the_next_search(served):
    q = np.full((2, DIM), -0.3, np.float32)
    q[1, ::2] *= -1
    with Client(served.server.url, token=TOKEN, binary=True) as b:
        out = b.upsert([1_000_005, 1_000_006], q, [1, 2], keys=["bin/a.png", "bin/b.png"])
        served.reference.upsert(torch.tensor([1_000_005, 1_000_006]), torch.from_numpy(q), torch.tensor([1, 2]))
        served.keys.update({1_000_005: "bin/a.png", 1_000_006: "bin/b.png"})
        assert out == {"upserted": 2, "count": len(served.reference)}
        hit = served.client.search(q, [0, 0], k=1)
        assert hit.ids.tolist() == [[1_000_005], [1_000_006]] and hit.keys == [["bin/a.png"], ["bin/b.png"]]
        with pytest.raises(ServiceError) as e:
            b.upsert([-4], q[:1], [0])
        assert e.value.status == 422 and e.value.fields == ["ids"]
    assert served.client.index_info()["counts"] == served.reference.counts()


def test_no_search_sees_half_an_upsert(served):
    """Each batch lands closer to q than the last; a search must see one batch whole, never a mix."""
    rng = np.random.default_rng(7)
    q = rng.normal(size=DIM).astype(np.float32)
    q /= np.linalg.norm(q)
    m, batches, base = 32, 12, 2_000_000
    directions = rng.normal(size=(batches, m, DIM)).astype(np.float32)
    mixed, seen, done = [], set(), threading.Event()

    def reader():
        with served.server.client() as c:
            while not done.is_set():
                ids = c.search(q[None], [0], k=m).ids[0]
                batch = {(int(i) - base) // m if i >= base else -1 for i in ids}
                seen.update(batch)
                if len(batch) != 1:
                    mixed.append(ids.tolist())

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for b in range(batches):
            # batch b lies at distance 0.8 s_b .. s_b from q, s_b = 0.3 * 0.6^b: closer than all earlier ones
            radius = 0.3 * 0.6 ** b * rng.uniform(0.8, 1.0, size=(m, 1))
            vecs = (q + radius * directions[b] / np.linalg.norm(directions[b], axis=1, keepdims=True)).astype(np.float32)
            served.upsert(list(range(base + b * m, base + (b + 1) * m)), vecs, [1] * m)
            time.sleep(0.02)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not mixed, mixed[:3]
    assert len(seen - {-1}) >= 2  # the readers really did run between batches


def test_snapshot_survives_a_restart_and_shutdown_is_graceful(served, tmp_path):
    folder = tmp_path / "copy"
    _build_index(folder, None)  # no checkpoint: the server starts without the model side
    first = Server(folder, tmp_path / "a.log")
    with first.client() as c:
        q = np.full((2, DIM), -0.2, np.float32)
        q[1] *= -1
        c.upsert([9_999_999, 9_999_998], q, [1, 1], keys=["kept/a", "kept/b"])
        assert c.index_info()["upserts_since_snapshot"] == 1
        snap = c.snapshot()
        assert snap["count"] == N + 2
        assert c.index_info()["upserts_since_snapshot"] == 0
        c.upsert([9_999_997], q[:1], [0])  # after the snapshot: lost at restart
    reloaded, manifest = faiss_index.load_index(folder)  # checksums verified
    assert len(reloaded) == N + 2 and manifest["owner"] == "lab 3"  # other manifest entries are kept
    assert not list(tmp_path.glob(".copy.*"))  # the atomic save left no temporary folder behind

    # a request still streaming its body when SIGTERM arrives is answered before the server stops
    started, answer = threading.Event(), {}

    def slow_body():
        yield b'{"vectors": [[' + b"-0.2, " * (DIM - 1)
        started.set()
        time.sleep(1.0)
        yield b'-0.2]], "labels": [0], "k": 1}'

    def slow_request():
        answer["r"] = httpx.post(first.url + "/v1/search", content=slow_body(), timeout=30,
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})

    t = threading.Thread(target=slow_request)
    t.start()
    assert started.wait(10)
    time.sleep(0.3)
    first.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert answer["r"].status_code == 200 and answer["r"].json()["ids"] == [[9_999_999]]
    assert first.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down cleanly
    log = _log_with(first.log, "search service stopped")
    assert "POST /v1/snapshot 200" in log and "search service stopped" in log

    # restarted without a token: reads are open, writes are refused
    second = Server(folder, tmp_path / "b.log", token=None)
    try:
        with second.client(token=None) as c:
            assert c.index_info()["count"] == N + 2
            hit = c.search(q, [0, 0], k=1)
            assert hit.ids.tolist() == [[9_999_999], [9_999_998]] and hit.keys == [["kept/a"], ["kept/b"]]
            for call in (lambda: c.upsert([1], q[:1], [0]), c.snapshot):
                with pytest.raises(ServiceError) as e:
                    call()
                assert e.value.status == 403 and "token" in str(e.value)
            with pytest.raises(ServiceError) as e:  # no checkpoint, so no image search
                c.search_image(b"\x89PNG", label=0)
            assert e.value.status == 409 and "checkpoint" in str(e.value)
            assert c.index_info()["image_search"] is False
    finally:
        assert second.stop() in (0, -signal.SIGTERM)
