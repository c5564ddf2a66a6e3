"""The distractor search service: a saved index served over HTTP (FastAPI; run it with uvicorn).

Endpoints (JSON; the schema is published at ``/docs`` and ``/openapi.json``):

* ``GET /healthz`` -- liveness, and whether the index is loaded (never needs the token);
* ``GET /v1/index`` -- manifest summary and counts per class;
* ``POST /v1/search`` ``{"vectors": [[...]], "labels": [...], "k": 5}`` -- nearest stored samples of
  another class: per query ``ids``, ``labels``, ``distances`` (null where there is none) and ``keys``;
  or the same as ``.npy`` arrays (Content-Type and Accept ``application/x-npy``, :mod:`.formats`);
* ``POST /v1/search/image`` (multipart ``file``, optional ``label`` and ``k``) -- embeds the image
  with the index's checkpoint (the ``embed`` callable), then searches;
* ``POST /v1/upsert`` ``{"ids", "vectors", "labels"[, "keys"]}`` (or ``.npy`` arrays) -- streams new
  embeddings in;
* ``POST /v1/snapshot`` -- saves the current state atomically into the index folder.

Security: writes always need the bearer token (a server without one refuses them), reads need it
when one is set, compared in constant time; request bodies and batches are capped (413); every
input error is a 422 naming the offending field. No request names a path: a snapshot goes to the
folder the server was started on, with :func:`faiss_index.save_index`.

Concurrency: searches run concurrently in a thread pool; upserts and snapshots hold the write side
of a readers-writer lock, so no search sees a half-applied batch.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from ..errors import IndexInputError
from ..indexes.base import BaseIndex
from ..npy_stream import SEARCH_ARRAYS, UPSERT_ARRAYS
from ..persistence import load_index, stored_keys
from . import formats
from .auth import TokenCheck, bearer_credentials
from .checks import RequestChecks, field_error
from .middleware import AccessLog, BodyLimit
from .rwlock import RWLock
from .schema import (
    Health,
    IndexInfo,
    SearchRequest,
    SearchResponse,
    SnapshotRequest,
    SnapshotResponse,
    UpsertRequest,
    UpsertResponse,
    json_body,
    npy_body,
    parse,
)
from .batching import SearchBatcher
from .service import Embedder, IndexService, ServiceLimits

LOG = logging.getLogger(__name__)

__all__ = ["create_app", "open_app"]


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
    checks = RequestChecks(limits, index.dim, index.num_classes)
    tokens = TokenCheck(token)
    bearer = HTTPBearer(auto_error=False, description="The server's token (--token or NIL_TOKEN).")
    state: dict[str, Any] = {}

    def loop_state() -> dict:
        # made inside the running event loop (asyncio primitives bind to it), at startup or first use
        if "lock" not in state:
            import anyio  # noqa: PLC0415

            state["lock"] = RWLock()
            state["search_slots"] = anyio.CapacityLimiter(limits.search_threads)
            state["batcher"] = (SearchBatcher(read_locked, service.search, limits.search_threads, limits.coalesce)
                                if limits.coalesce else None)
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

    async def can_read(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        tokens.check_read(cred)

    async def can_write(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        tokens.check_write(cred, service.writable)

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

    async def read(fn, *args, **kw):
        st = loop_state()
        async with st["lock"].read():
            async with st["search_slots"]:
                return await run_in_threadpool(fn, *args, **kw)

    async def read_locked(fn, *args):
        # the batcher's runner: it limits the batches in flight to the search threads itself
        async with loop_state()["lock"].read():
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

    def search_answer(xq: np.ndarray, yq: np.ndarray, k: int, encode, **extra):
        return encode(service.search(xq, yq, k), **extra)  # encoded in the worker thread, off the event loop

    # The hot path parses its body with pydantic's own JSON parser and checks the token inline: FastAPI's
    # json.loads + validation and its dependency solving cost about 1.3 ms of the event loop's time per
    # request of 32 x 128 floats, against 0.2 ms. The schema is published all the same (openapi_extra).
    @app.post("/v1/search", response_model=SearchResponse, tags=["search"],
              responses={200: {"content": {"application/x-npy": npy_body(
                             "ids, labels (Q, k) int64, distances (Q, k) float32, keys (Q, k) str")}},
                         401: {"description": "missing or wrong token (when the server has one)"},
                         413: {"description": "more vectors than --max-batch, or a body over the limit"},
                         415: {"description": "an .npz body (send application/x-npy)"},
                         422: {"description": "invalid request; detail names the field"}},
              openapi_extra={"requestBody": json_body(SearchRequest, npy="vectors (Q, D) float32, labels (Q,) "
                                                                         "integers; k as the query parameter k"),
                             "security": [{"HTTPBearer": []}]})
    async def search(request: Request):
        """Nearest stored samples of another class than each query's label (JSON, or .npy arrays)."""
        tokens.check_read(bearer_credentials(request))
        body = await request.body()
        if formats.sends_arrays(request):
            k = formats.query_int(request, "k", 5)
            xq, yq = checks.query_arrays(formats.read_arrays(body, SEARCH_ARRAYS), k)
        else:
            req = parse(SearchRequest, body)
            k = req.k
            xq, yq = checks.queries(req.vectors, req.labels, k)
        encode = formats.answer_encoder(request)
        batcher = loop_state()["batcher"]
        if batcher is not None:
            return await batcher.submit(xq, yq, k, encode)
        return await read(search_answer, xq, yq, k, encode)

    @app.post("/v1/search/image", response_model=SearchResponse, dependencies=[Depends(can_read)],
              tags=["search"], responses={409: {"description": "the server has no checkpoint"}})
    async def search_image(file: UploadFile = File(..., description="An image file (png, jpg, tif, bmp)."),
                           label: int | None = Form(None, description="Its class [default: the model's prediction]."),
                           k: int = Form(5, description="Neighbours per query.")):
        """Embed an uploaded image with the index's checkpoint, then search like /v1/search."""
        if service.embed is None:
            raise HTTPException(409, "this server has no checkpoint to embed images with; start it with "
                                     "--checkpoint (or build the index from one).")
        checks.k(k)
        if label is not None:
            checks.label(label)
        data = await file.read()
        try:
            z, predicted = await run_in_threadpool(service.embed, data)
        except ValueError as exc:
            raise field_error("file", str(exc)) from None
        if label is None:
            if predicted is None:
                raise field_error("label", "label is required: the embedder predicts no class.")
            label = predicted
        xq = checks.vectors(np.asarray(z, dtype=np.float32).reshape(1, -1).tolist())
        return await read(search_answer, xq, np.array([label], dtype=np.int64), k, formats.json_answer,
                          query_labels=[int(label)])

    @app.post("/v1/upsert", response_model=UpsertResponse, dependencies=[Depends(can_write)], tags=["index"],
              responses={415: {"description": "an .npz body (send application/x-npy)"}},
              openapi_extra={"requestBody": json_body(UpsertRequest, npy="ids (B,) integers, vectors (B, D) "
                                                                         "float32, labels (B,) integers[, keys (B,) str]")})
    async def upsert(request: Request):
        """Insert or replace samples (a known id's vector, label and key are replaced); JSON or .npy arrays."""
        body = await request.body()
        if formats.sends_arrays(request):
            arrays = formats.read_arrays(body, UPSERT_ARRAYS, ("keys",))
            ids, xb, yb, keys = checks.upsert_arrays(arrays)
        else:
            req = parse(UpsertRequest, body)
            ids, xb, yb = checks.upsert(req.ids, req.vectors, req.labels, req.keys)
            keys = req.keys
        return await write(service.upsert, ids, xb, yb, keys)

    @app.post("/v1/snapshot", response_model=SnapshotResponse, dependencies=[Depends(can_write)], tags=["index"])
    async def snapshot(req: SnapshotRequest | None = None):
        """Save the current state atomically into the served index folder (no other path can be named)."""
        return await write(service.snapshot)

    app.state.service = service
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    app.add_middleware(AccessLog)  # added last, so outermost: its time covers the whole request
    return app


def open_app(index_dir: str | Path, device: str = "cpu", **kw):
    """Load the index in ``index_dir`` onto ``device`` and return :func:`create_app`'s app."""
    index, manifest = load_index(index_dir, device=device)
    keys = stored_keys(index_dir, len(index))
    return create_app(index, manifest, index_dir, keys=keys, **kw)
