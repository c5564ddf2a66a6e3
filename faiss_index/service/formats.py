"""The service's two body formats: JSON, and arrays in ``.npy`` format (:mod:`faiss_index.npy_stream`).

A request is read as arrays when its Content-Type is ``application/x-npy``, as JSON otherwise; a
search is answered as arrays when the Accept header names ``application/x-npy``, as JSON otherwise
(errors are always JSON). The two carry the same fields:

* ``POST /v1/search``: request ``vectors`` (Q, D) float32, then ``labels`` (Q,) integers, with
  ``k`` as a query parameter (``/v1/search?k=5``, default 5): a scalar has no place in a stream of
  arrays, and the URL keeps the body a plain sequence that ``np.save`` writes. Answer ``ids``,
  ``labels`` (Q, k) int64 (-1 where there is no neighbour), ``distances`` (Q, k) float32 (inf
  where none), ``keys`` (Q, k) str, in that order (also named by the ``X-Arrays`` header).
* ``POST /v1/upsert``: request ``ids`` (B,) integers, ``vectors`` (B, D) float32, ``labels`` (B,)
  integers, and optionally ``keys`` (B,) str; the answer (two counts) stays JSON.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import numpy as np
from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from .. import npy_stream
from .checks import field_error

LOG = logging.getLogger(__name__)

__all__ = ["answer_encoder", "json_answer", "npy_answer", "query_int", "read_arrays", "sends_arrays"]



def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def sends_arrays(request: Request) -> bool:
    """Whether the body is ``.npy`` arrays (415 for an ``.npz`` archive, a likely mix-up)."""
    media = _media_type(request.headers.get("content-type"))
    if media == "application/x-npz":
        raise HTTPException(415, "send the arrays as application/x-npy (np.save each into one buffer, in the "
                                 "endpoint's order), or JSON; .npz archives are not taken.")
    return media == npy_stream.MEDIA_TYPE


def read_arrays(body: bytes, names: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The body's arrays by name; a 422 naming the array at fault otherwise."""
    try:
        return npy_stream.loads(body, names, optional)
    except npy_stream.NpyStreamError as exc:
        if exc.field == "body":
            raise RequestValidationError([{"loc": ("body",), "msg": str(exc), "type": "value_error"}]) from None
        raise field_error(exc.field, str(exc)) from None


def query_int(request: Request, name: str, default: int) -> int:
    """An integer query parameter, or a 422 naming it."""
    value = request.query_params.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise field_error(name, f"{name} must be an integer, got {value[:50]!r}.", "query") from None


def json_answer(result: dict[str, np.ndarray], **extra) -> Response:
    """A search result (see IndexService.search) as JSON: lists of lists, null for a missing distance."""
    found = result["ids"] >= 0
    distances = result["distances"].tolist()
    if not found.all():  # JSON has no infinity: a missing neighbour has distance null
        distances = [[d if f else None for d, f in zip(dr, fr)] for dr, fr in zip(distances, found.tolist())]
    payload = {"ids": result["ids"].tolist(), "labels": result["labels"].tolist(), "distances": distances,
               "keys": result["keys"].tolist(), **extra}
    return Response(json.dumps(payload, separators=(",", ":")), media_type="application/json")


def npy_answer(result: dict[str, np.ndarray]) -> Response:
    """A search result as the arrays of ``npy_stream.ANSWER_ARRAYS``, one after another in ``.npy`` format."""
    arrays = {**result, "keys": result["keys"].astype(str)}  # object -> fixed-width str: no pickles needed
    body = npy_stream.dumps(*(arrays[name] for name in npy_stream.ANSWER_ARRAYS))
    return Response(body, media_type=npy_stream.MEDIA_TYPE, headers={"X-Arrays": ",".join(npy_stream.ANSWER_ARRAYS)})


def answer_encoder(request: Request):
    """:func:`npy_answer` when the request's Accept header asks for arrays, else :func:`json_answer`."""
    return npy_answer if npy_stream.accepts(request.headers.get("accept")) else json_answer
