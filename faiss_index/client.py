"""A small Python client of the distractor search service (``nil index serve``).

>>> from faiss_index.client import Client
>>> with Client("http://127.0.0.1:8000", token="...") as c:          # doctest: +SKIP
...     hits = c.search(z, labels, k=5)        # z (Q, D) float32, labels (Q,) int
...     hits.ids, hits.distances, hits.keys     # (Q, k) int64, (Q, k) float32, Q lists of k str

``Client(..., binary=True)`` sends searches and upserts as ``.npy`` arrays and reads the answers
as arrays (:mod:`faiss_index.npy_stream`): the same results, for less CPU on both sides than JSON.
Every 4xx/5xx answer raises :class:`ServiceError` carrying the status and the server's detail.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from . import npy_stream

LOG = logging.getLogger(__name__)

__all__ = ["Client", "ServiceError", "Neighbours"]


class ServiceError(Exception):
    """The service answered with an error: ``status`` (int) and ``detail`` (str or list of field errors)."""

    def __init__(self, status: int, detail: Any):
        self.status = status
        self.detail = detail
        super().__init__(f"{status}: {_describe(detail)}")

    @property
    def fields(self) -> list[str]:
        """Names of the offending fields of a 422 (the last name in each error's location)."""
        if not isinstance(self.detail, list):
            return []
        out = []
        for e in self.detail:
            names = [x for x in (e.get("loc") or []) if isinstance(x, str) and x not in ("body", "query")]
            if names:
                out.append(names[0])
        return out


def _describe(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(str(x) for x in e.get('loc', []))}: {e.get('msg')}" if isinstance(e, dict)
                         else str(e) for e in detail)
    return str(detail)


@dataclass
class Neighbours:
    """Search results of Q queries: ids and labels (Q, k) int64 (-1 for none), distances (Q, k)
    float32 (inf for none), keys Q lists of k str, and query_labels (Q,) for an image search."""

    ids: np.ndarray
    labels: np.ndarray
    distances: np.ndarray
    keys: list[list[str]]
    query_labels: np.ndarray | None = None

    @classmethod
    def from_json(cls, payload: dict) -> "Neighbours":
        dist = np.array([[np.inf if d is None else d for d in row] for row in payload["distances"]], dtype=np.float32)
        q = len(payload["ids"])
        k = len(payload["ids"][0]) if q else 0
        ql = payload.get("query_labels")
        return cls(ids=np.array(payload["ids"], dtype=np.int64).reshape(q, k),
                   labels=np.array(payload["labels"], dtype=np.int64).reshape(q, k),
                   distances=dist.reshape(q, k), keys=payload["keys"],
                   query_labels=None if ql is None else np.array(ql, dtype=np.int64))

    @classmethod
    def from_npy(cls, body: bytes) -> Neighbours:
        a = npy_stream.loads(body, npy_stream.ANSWER_ARRAYS)
        return cls(ids=a["ids"], labels=a["labels"], distances=a["distances"], keys=a["keys"].tolist())


def _array(x: Any, dtype) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on a GPU
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _rows(x: Any, dtype) -> list:
    return _array(x, dtype).tolist()


class Client:
    """Talks to one service at ``url``; ``token`` is sent as a bearer token when given; ``binary``
    sends searches and upserts as ``.npy`` arrays (and reads search answers so) instead of JSON."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None, binary: bool = False):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)
        self.binary = binary

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ requests
    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        r = self._http.request(method, path, **kw)
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except (ValueError, AttributeError):
                detail = r.text
            raise ServiceError(r.status_code, detail)
        return r

    def _call(self, method: str, path: str, **kw) -> dict:
        return self._request(method, path, **kw).json()

    def _post_npy(self, path: str, *arrays: np.ndarray, **kw) -> httpx.Response:
        headers = {"Content-Type": npy_stream.MEDIA_TYPE, "Accept": f"{npy_stream.MEDIA_TYPE}, application/json"}
        return self._request("POST", path, content=npy_stream.dumps(*arrays), headers=headers, **kw)

    def _post_json(self, path: str, payload: dict) -> dict:
        # allow_nan: a NaN is sent as such, so the server names it instead of the client failing
        body = json.dumps(payload, separators=(",", ":")).encode()
        return self._call("POST", path, content=body, headers={"Content-Type": "application/json"})

    def healthz(self) -> dict:
        """{"status": "ok", "index_loaded": True, "count": N}."""
        return self._call("GET", "/healthz")

    def index_info(self) -> dict:
        """Manifest summary: kind, dim, classes, count, counts per class, params, device, ..."""
        return self._call("GET", "/v1/index")

    def search(self, vectors: Any, labels: Any, k: int = 5) -> Neighbours:
        """Nearest stored samples of another class: vectors (Q, D) float, labels (Q,) int."""
        if self.binary:
            r = self._post_npy("/v1/search", _array(vectors, np.float32), _array(labels, np.int64),
                               params={"k": int(k)})
            return Neighbours.from_npy(r.content)
        payload = {"vectors": _rows(vectors, np.float32), "labels": _rows(labels, np.int64), "k": int(k)}
        return Neighbours.from_json(self._post_json("/v1/search", payload))

    def search_image(self, image: str | Path | bytes, label: int | None = None, k: int = 5) -> Neighbours:
        """Embed an image (a file path or its bytes) with the server's checkpoint, then search."""
        data = image if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()
        name = "image" if isinstance(image, (bytes, bytearray)) else Path(image).name
        form = {"k": str(int(k))}
        if label is not None:
            form["label"] = str(int(label))
        return Neighbours.from_json(self._call("POST", "/v1/search/image", files={"file": (name, bytes(data))},
                                               data=form))

    def upsert(self, ids: Any, vectors: Any, labels: Any, keys: list[str] | None = None) -> dict:
        """Insert or replace samples: ids (B,) int >= 0, vectors (B, D), labels (B,); needs the token."""
        if self.binary:
            arrays = [_array(ids, np.int64), _array(vectors, np.float32), _array(labels, np.int64)]
            if keys is not None:
                arrays.append(np.array([str(x) for x in keys], dtype=str))
            return self._post_npy("/v1/upsert", *arrays).json()
        payload = {"ids": _rows(ids, np.int64), "vectors": _rows(vectors, np.float32), "labels": _rows(labels, np.int64)}
        if keys is not None:
            payload["keys"] = [str(x) for x in keys]
        return self._post_json("/v1/upsert", payload)

    def snapshot(self) -> dict:
        """Save the served state into the index folder, atomically; needs the token."""
        return self._post_json("/v1/snapshot", {})
