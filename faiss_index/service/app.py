"""The distractor search service: a saved index served over HTTP (FastAPI; run it with uvicorn).

Endpoints (JSON; the schema is published at ``/docs`` and ``/openapi.json``):

* ``GET /healthz`` -- liveness, and whether the index is loaded (never needs the token);
* ``GET /v1/index`` -- manifest summary and counts per class;
* ``POST /v1/search`` ``{"vectors": [[...]], "labels": [...], "k": 5}`` -- nearest stored samples of
  another class: per query ``ids``, ``labels``, ``distances`` (null where there is none) and ``keys``;
* ``POST /v1/search/image`` (multipart ``file``, optional ``label`` and ``k``) -- embeds the image
  with the index's checkpoint (the ``embed`` callable), then searches;
* ``POST /v1/upsert`` ``{"ids", "vectors", "labels"[, "keys"]}`` -- streams new embeddings in;
* ``POST /v1/snapshot`` -- saves the current state atomically into the index folder.

Security: writes always need the bearer token (a server without one refuses them), reads need it
when one is set, compared in constant time; request bodies and batches are capped (413); every
input error is a 422 naming the offending field. No request names a path: a snapshot goes to the
folder the server was started on, with :func:`faiss_index.save_index`.

Concurrency: searches run concurrently in a thread pool; upserts and snapshots hold the write side
of a readers-writer lock, so no search sees a half-applied batch.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable

import numpy as np
import torch
from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError
from starlette.concurrency import run_in_threadpool

from ..indexes.base import BaseIndex
from ..errors import IndexInputError
from ..persistence.save import EMBEDDINGS, load_index, save_index

LOG = logging.getLogger(__name__)

__all__ = ["ServiceLimits", "Embedder", "create_app", "open_app", "check_bind", "stored_keys"]

# (image bytes) -> (embedding (D,) float32, predicted class or None); raises ValueError for a bad image
Embedder = Callable[[bytes], "tuple[np.ndarray, int | None]"]

# Manifest entries save_index writes itself; everything else in a loaded manifest is carried over
# unchanged by a snapshot (e.g. the "checkpoint" path `nil index build` records).
_WRITTEN_BY_SAVE = {"format_version", "dim", "metric", "num_classes", "classes", "counts", "count", "kind",
                    "strategy", "params", "construct", "engine", "steps_since_refresh", "checkpoint_sha256",
                    "source", "created", "files"}
_INT64_MAX = (1 << 63) - 1


@dataclass
class ServiceLimits:
    """What one request may ask for; more is refused with 413 (size) or 422 (k)."""

    max_batch: int = 1024               # query vectors per search, rows per upsert
    max_k: int = 100                    # neighbours per query
    max_body_bytes: int = 32 << 20      # request body, JSON or image upload
    search_threads: int = 4             # searches run at once (each also uses torch's intra-op threads)


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve beyond the loopback interface without a token (raises IndexInputError)."""
    if token:
        return
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise IndexInputError(f"refusing to listen on {host} without a token: anyone who can reach it could "
                              "read the index; set --token (or NIL_TOKEN), or bind to 127.0.0.1.")


def stored_keys(index_dir: str | Path, n: int) -> np.ndarray:
    """The (n,) object array of sample keys saved in an index folder, in store order."""
    import zarr  # noqa: PLC0415

    keys = zarr.open_group(str(Path(index_dir) / EMBEDDINGS), mode="r")["keys"][...]
    out = np.empty(n, dtype=object)
    out[:] = [str(k) for k in np.asarray(keys).tolist()] if n else []
    return out


# ------------------------------------------------------------------------------------ schema
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchRequest(_Strict):
    vectors: list[list[StrictFloat]] = Field(description="Q query vectors of the index's dimension.")
    labels: list[StrictInt] = Field(description="Q query labels; the search returns samples of other classes.")
    k: StrictInt = Field(5, description="Neighbours per query.")


class SearchResponse(BaseModel):
    ids: list[list[int]] = Field(description="Q x k sample ids, nearest first; -1 where there is none.")
    labels: list[list[int]] = Field(description="Q x k labels of the neighbours; -1 where there is none.")
    distances: list[list[float | None]] = Field(description="Q x k Euclidean distances; null where there is none.")
    keys: list[list[str]] = Field(description="Q x k sample keys (e.g. file names); empty where unknown.")
    query_labels: list[int] | None = Field(None, description="/v1/search/image: the label searched with.")


class UpsertRequest(_Strict):
    ids: list[Annotated[StrictInt, Field(ge=0, le=_INT64_MAX)]] = Field(
        description="B sample ids >= 0; a known id is replaced.")
    vectors: list[list[StrictFloat]] = Field(description="B vectors of the index's dimension.")
    labels: list[StrictInt] = Field(description="B labels.")
    keys: list[StrictStr] | None = Field(None, description="B sample keys (e.g. file names).")


class UpsertResponse(BaseModel):
    upserted: int = Field(description="Distinct ids written.")
    count: int = Field(description="Samples stored after the upsert.")


class SnapshotRequest(_Strict):
    """No fields: a snapshot always goes to the served index folder."""


class SnapshotResponse(BaseModel):
    count: int
    created: str
    files: int


class Health(BaseModel):
    status: str
    index_loaded: bool
    count: int


class IndexInfo(BaseModel):
    index: str = Field(description="Name of the served index folder.")
    kind: str
    dim: int
    metric: str
    classes: list[str]
    count: int
    counts: list[int]
    params: dict
    source: str | None
    created: str | None
    checkpoint_sha256: str | None
    device: str
    image_search: bool
    writable: bool
    upserts_since_snapshot: int


# ------------------------------------------------------------------------------------ the lock
class RWLock:
    """An asyncio readers-writer lock: many readers at once, or one writer; waiting writers go first.

    Hold it around awaited thread-pool work that cannot be abandoned (starlette's
    ``run_in_threadpool``): a cancelled request then still waits for its thread before releasing.
    """

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def read(self):
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def write(self):
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and not self._readers)
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            async with self._cond:
                self._writer = False
                self._cond.notify_all()


# ------------------------------------------------------------------------------- the service
class IndexService:
    """The index behind the HTTP layer: validated numpy in, JSON-ready results out (blocking calls)."""

    def __init__(self, index: BaseIndex, manifest: dict, folder: Path, keys: np.ndarray | None,
                 embed: Embedder | None, writable: bool):
        self.index = index
        self.manifest = dict(manifest)
        self.folder = Path(folder)
        n = len(index)
        self.keys = np.full(max(n, 1024), "", dtype=object)
        if keys is not None:
            if len(keys) != n:
                raise IndexInputError(f"keys has {len(keys)} entries but the index stores {n} samples.")
            self.keys[:n] = keys
        self.embed = embed
        self.writable = writable
        self.upserts_since_snapshot = 0

    # ----------------------------------------------------------------- reads
    def search(self, xq: np.ndarray, yq: np.ndarray, k: int) -> dict:
        """xq (Q, D) float32, yq (Q,) int64 -> {"ids", "labels", "distances", "keys"}, each Q lists of k."""
        res = self.index.search_other_class(torch.from_numpy(xq), torch.from_numpy(yq), k)
        ids = res.ids.cpu()
        found = ids >= 0
        rows = self.index.store.rows_of(ids.clamp_min(0).reshape(-1)).cpu().numpy()
        keys = np.where(found.reshape(-1).numpy(), self.keys[rows], "").reshape(ids.shape).tolist()
        dist = res.distances.cpu().numpy()
        distances = dist.tolist()
        if not bool(found.all()):  # JSON has no infinity: a missing neighbour has distance null
            distances = [[d if f else None for d, f in zip(dr, fr)]
                         for dr, fr in zip(distances, found.tolist())]
        return {"ids": ids.tolist(), "labels": res.labels.cpu().tolist(), "distances": distances, "keys": keys}

    def info(self) -> dict:
        m = self.manifest
        return {
            "index": self.folder.name, "kind": self.index.kind, "dim": self.index.dim, "metric": m.get("metric", "l2"),
            "classes": m["classes"], "count": len(self.index), "counts": self.index.counts(),
            "params": m.get("params", {}), "source": m.get("source"), "created": m.get("created"),
            "checkpoint_sha256": m.get("checkpoint_sha256"), "device": str(self.index.device),
            "image_search": self.embed is not None, "writable": self.writable,
            "upserts_since_snapshot": self.upserts_since_snapshot,
        }

    # ----------------------------------------------------------------- writes
    def upsert(self, ids: np.ndarray, xb: np.ndarray, yb: np.ndarray, keys: list[str] | None) -> dict:
        """ids (B,) int64 >= 0, xb (B, D) float32, yb (B,) int64; a known id's vector is replaced."""
        t_ids = torch.from_numpy(ids)
        self.index.upsert(t_ids, torch.from_numpy(xb), torch.from_numpy(yb))
        rows = self.index.store.rows_of(t_ids).cpu().numpy()
        n = len(self.index)
        if n > len(self.keys):
            grown = np.full(max(n, 2 * len(self.keys)), "", dtype=object)
            grown[: len(self.keys)] = self.keys
            self.keys = grown
        if keys is not None:
            for r, key in zip(rows.tolist(), keys):  # in order, so the last duplicate wins like the vectors
                self.keys[r] = key
        self.upserts_since_snapshot += 1
        return {"upserted": int(np.unique(ids).size), "count": n}

    def snapshot(self) -> dict:
        m = self.manifest
        extra = {k: v for k, v in m.items() if k not in _WRITTEN_BY_SAVE}
        n = len(self.index)
        save_index(self.index, self.folder, classes=m["classes"], keys=self.keys[:n].tolist(),
                   checkpoint_sha256=m.get("checkpoint_sha256"), source=m.get("source"), extra=extra)
        self.manifest = json.loads((self.folder / "manifest.json").read_text(encoding="utf-8"))
        self.upserts_since_snapshot = 0
        return {"count": n, "created": self.manifest["created"], "files": len(self.manifest["files"])}


def _json_body(model: type[BaseModel]) -> dict:
    """An OpenAPI requestBody for a JSON body of ``model`` (for routes that parse their body themselves)."""
    return {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}


def _parse(model: type[BaseModel], body: bytes) -> BaseModel:
    """Validate a JSON body; errors become FastAPI's 422 with locations under "body"."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError([{"loc": ("body", *e["loc"]), "msg": e["msg"], "type": e["type"]}
                                      for e in exc.errors(include_url=False, include_input=False)]) from None


def _bearer_credentials(request: Request) -> HTTPAuthorizationCredentials | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        return None
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=credentials.strip())


# --------------------------------------------------------------------------------- middleware
class _BodyLimit:
    """413 for a request body over ``limit`` bytes: by Content-Length up front, and while streaming."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False  # h11 rejects a malformed Content-Length before we see it
                if too_big:
                    return await _send_json(send, 413, {"detail": self._detail()})
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # an HTTPException, so FastAPI's body reader passes it on as is
                    raise _TooLarge(413, self._detail())
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if started:
                raise
            await _send_json(send, 413, {"detail": self._detail()})

    def _detail(self) -> str:
        return f"request body exceeds the limit of {self.limit} bytes."


class _TooLarge(HTTPException):
    pass


class _AccessLog:
    """One log line per request: method, path, status, milliseconds."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            LOG.info("%s %s %d %.1f ms", scope["method"], scope["path"], status, (time.perf_counter() - t0) * 1e3)


async def _send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------ the app
def create_app(index: BaseIndex, manifest: dict, folder: str | Path, *, keys: np.ndarray | None = None,
               embed: Embedder | None = None, token: str | None = None, limits: ServiceLimits | None = None,
               writable: bool = True):
    """The FastAPI application serving ``index`` (loaded from ``folder`` with ``manifest``).

    keys: (N,) sample keys in store order (see :func:`stored_keys`). embed: image bytes -> (z (D,),
    predicted class or None), enabling ``/v1/search/image``. token: bearer token, needed for every
    request but ``/healthz`` and the docs when set, and for every write always. writable: False
    refuses upserts and snapshots (e.g. several worker processes, each with its own copy).
    """
    limits = limits or ServiceLimits()
    service = IndexService(index, manifest, Path(folder), keys, embed, writable)
    bearer = HTTPBearer(auto_error=False, description="The server's token (--token or NIL_TOKEN).")
    expected = token.encode() if token else None
    state: dict[str, Any] = {}

    def loop_state() -> dict:
        # made inside the running event loop (asyncio primitives bind to it), at startup or first use
        if "lock" not in state:
            import anyio  # noqa: PLC0415

            state["lock"] = RWLock()
            state["search_slots"] = anyio.CapacityLimiter(limits.search_threads)
        return state

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.clear()
        loop_state()
        m = service.manifest
        LOG.info("serving %s index %s (%d vectors, %d-d, %d classes; source %s; checkpoint %s) on %s "
                 "(%d torch threads, %d search threads); image search %s; writes %s",
                 index.kind, Path(folder).resolve(), len(index), index.dim, index.num_classes, m.get("source"),
                 (m.get("checkpoint_sha256") or "none")[:12], index.device, torch.get_num_threads(),
                 limits.search_threads, "on" if embed else "off",
                 ("token" if token else "off (no token)") if writable else "off (read-only)")
        yield
        LOG.info("search service stopped")

    app = FastAPI(title="nil distractor search", version="1",
                  description="Nearest stored samples of another class, for a saved nil index.", lifespan=lifespan)

    def _authorised(cred: HTTPAuthorizationCredentials | None) -> bool:
        return cred is not None and hmac.compare_digest(cred.credentials.encode(), expected)

    def _unauthorised() -> HTTPException:
        return HTTPException(401, "missing or wrong bearer token.", headers={"WWW-Authenticate": "Bearer"})

    async def can_read(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if expected is not None and not _authorised(cred):
            raise _unauthorised()

    async def can_write(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if expected is None:
            raise HTTPException(403, "this server has no token, so writes are disabled; start it with --token "
                                     "(or NIL_TOKEN).")
        if not _authorised(cred):
            raise _unauthorised()
        if not service.writable:
            raise HTTPException(409, "this server is read-only (several worker processes each hold their own "
                                     "copy of the index); serve with --workers 1 to upsert or snapshot.")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        # Only loc, msg and type: echoing the input could be megabytes, or NaN (not JSON).
        errors = []
        for e in exc.errors():
            msg = str(e.get("msg", "invalid"))
            if e.get("type") == "json_invalid" and isinstance(e.get("ctx"), dict):
                msg = f"{msg}: {e['ctx'].get('error')}"
            errors.append({"loc": [x if isinstance(x, (int, str)) else str(x) for x in e.get("loc", ())],
                           "msg": msg[:500], "type": str(e.get("type", "value_error"))})
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(IndexInputError)
    async def _bad_input(request: Request, exc: IndexInputError):
        return JSONResponse({"detail": [{"loc": ["body"], "msg": str(exc), "type": "value_error"}]}, status_code=422)

    def field_error(field: str, msg: str) -> RequestValidationError:
        return RequestValidationError([{"loc": ("body", field), "msg": msg, "type": "value_error"}])

    def queries(vectors: list, labels: list, k: int) -> tuple[np.ndarray, np.ndarray]:
        check_batch("vectors", len(vectors))
        if not 1 <= k <= limits.max_k:
            raise field_error("k", f"k must lie in 1..{limits.max_k}, got {k}.")
        return as_vectors(vectors), as_labels(labels, len(vectors))

    def check_batch(field: str, n: int) -> None:
        if n > limits.max_batch:
            raise HTTPException(413, f"{field} holds {n} rows; this server takes at most {limits.max_batch} "
                                     "per request (--max-batch).")

    def as_vectors(vectors: list) -> np.ndarray:
        if not vectors:
            raise field_error("vectors", "vectors is empty; send at least one row.")
        try:
            with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused just below
                x = np.array(vectors, dtype=np.float32)
        except ValueError:
            raise field_error("vectors", "vectors rows have different lengths.") from None
        if x.shape[1] != index.dim:
            raise field_error("vectors", f"vectors have dimension {x.shape[1]} but the index has dimension "
                                         f"{index.dim}.")
        if not np.isfinite(x).all():
            raise field_error("vectors", "vectors contain NaN or infinite values (or values beyond float32).")
        return x

    def as_labels(labels: list, n: int) -> np.ndarray:
        if len(labels) != n:
            raise field_error("labels", f"labels has {len(labels)} entries for {n} vectors.")
        bad = [y for y in labels if not 0 <= y < index.num_classes]
        if bad:
            raise field_error("labels", f"label {bad[0]} is unknown; labels lie in 0..{index.num_classes - 1}.")
        return np.array(labels, dtype=np.int64)

    def json_response(payload: dict) -> Response:
        return Response(json.dumps(payload, separators=(",", ":")), media_type="application/json")

    async def read(fn, *args):
        st = loop_state()
        async with st["lock"].read():
            async with st["search_slots"]:
                return await run_in_threadpool(fn, *args)

    async def write(fn, *args):
        async with loop_state()["lock"].write():
            return await run_in_threadpool(fn, *args)

    # ------------------------------------------------------------------ routes
    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz():
        """Liveness: the process answers and the index is loaded."""
        return {"status": "ok", "index_loaded": True, "count": len(index)}

    @app.get("/v1/index", response_model=IndexInfo, dependencies=[Depends(can_read)], tags=["index"])
    async def index_info():
        """Manifest summary of the served index: kind, dimension, classes, counts per class."""
        async with loop_state()["lock"].read():
            return service.info()

    # The hot path parses its body with pydantic's own JSON parser and checks the token inline: FastAPI's
    # json.loads + validation and its dependency solving cost about 1.3 ms of the event loop's time per
    # request of 32 x 128 floats, against 0.2 ms. The schema is published all the same (openapi_extra).
    @app.post("/v1/search", response_model=SearchResponse, tags=["search"],
              responses={401: {"description": "missing or wrong token (when the server has one)"},
                         413: {"description": "more vectors than --max-batch, or a body over the limit"},
                         422: {"description": "invalid request; detail names the field"}},
              openapi_extra={"requestBody": _json_body(SearchRequest), "security": [{"HTTPBearer": []}]})
    async def search(request: Request):
        """Nearest stored samples of another class than each query's label."""
        if expected is not None and not _authorised(_bearer_credentials(request)):
            raise _unauthorised()
        req = _parse(SearchRequest, await request.body())
        xq, yq = queries(req.vectors, req.labels, req.k)
        return json_response(await read(service.search, xq, yq, req.k))

    @app.post("/v1/search/image", response_model=SearchResponse, dependencies=[Depends(can_read)],
              tags=["search"], responses={409: {"description": "the server has no checkpoint"}})
    async def search_image(file: UploadFile = File(..., description="An image file (png, jpg, tif, bmp)."),
                           label: int | None = Form(None, description="Its class [default: the model's prediction]."),
                           k: int = Form(5, description="Neighbours per query.")):
        """Embed an uploaded image with the index's checkpoint, then search like /v1/search."""
        if service.embed is None:
            raise HTTPException(409, "this server has no checkpoint to embed images with; start it with "
                                     "--checkpoint (or build the index from one).")
        if not 1 <= k <= limits.max_k:
            raise field_error("k", f"k must lie in 1..{limits.max_k}, got {k}.")
        if label is not None and not 0 <= label < index.num_classes:
            raise field_error("label", f"label {label} is unknown; labels lie in 0..{index.num_classes - 1}.")
        data = await file.read()
        try:
            z, predicted = await run_in_threadpool(service.embed, data)
        except ValueError as exc:
            raise field_error("file", str(exc)) from None
        if label is None:
            if predicted is None:
                raise field_error("label", "label is required: the embedder predicts no class.")
            label = predicted
        xq = as_vectors(np.asarray(z, dtype=np.float32).reshape(1, -1).tolist())
        result = await read(service.search, xq, np.array([label], dtype=np.int64), k)
        return json_response({**result, "query_labels": [int(label)]})

    @app.post("/v1/upsert", response_model=UpsertResponse, dependencies=[Depends(can_write)], tags=["index"])
    async def upsert(req: UpsertRequest):
        """Insert or replace samples (a known id's vector, label and key are replaced)."""
        check_batch("vectors", len(req.vectors))
        xb = as_vectors(req.vectors)
        yb = as_labels(req.labels, len(xb))
        if len(req.ids) != len(xb):
            raise field_error("ids", f"ids has {len(req.ids)} entries for {len(xb)} vectors.")
        if req.keys is not None and len(req.keys) != len(xb):
            raise field_error("keys", f"keys has {len(req.keys)} entries for {len(xb)} vectors.")
        ids = np.array(req.ids, dtype=np.int64)
        return await write(service.upsert, ids, xb, yb, req.keys)

    @app.post("/v1/snapshot", response_model=SnapshotResponse, dependencies=[Depends(can_write)], tags=["index"])
    async def snapshot(req: SnapshotRequest | None = None):
        """Save the current state atomically into the served index folder (no other path can be named)."""
        return await write(service.snapshot)

    app.state.service = service
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)
    app.add_middleware(_AccessLog)  # added last, so outermost: its time covers the whole request
    return app


def open_app(index_dir: str | Path, device: str = "cpu", **kw):
    """Load the index in ``index_dir`` onto ``device`` and return :func:`create_app`'s app."""
    index, manifest = load_index(index_dir, device=device)
    keys = stored_keys(index_dir, len(index))
    return create_app(index, manifest, index_dir, keys=keys, **kw)
