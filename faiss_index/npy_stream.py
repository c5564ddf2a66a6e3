"""Arrays one after another in ``.npy`` format: the binary bodies of the search service and its client.

A body is what ``np.save`` writes when called once per array on the same file, in a fixed order::

    buf = io.BytesIO()
    np.save(buf, vectors)   # (Q, D) float32
    np.save(buf, labels)    # (Q,) int64
    body = buf.getvalue()   # Content-Type: application/x-npy

Why this and not JSON or ``.npz``: a search of 32 x 128 floats costs about 420 us to parse as JSON
and 370 us as an ``.npz`` (Python's zipfile around each member), against 140 us for two ``.npy``
arrays read in turn; its answer encodes in 70 us against 130 us (JSON) and 210 us (``.npz``). The
format is numpy's own, so any client writes it with ``np.save`` and reads it with ``np.load``;
the order of the arrays is fixed by the endpoint (the names given to :func:`loads`).

Reading uses ``np.load(allow_pickle=False)`` on each array, so nothing is ever unpickled: an
object array, a pickle, a truncated or corrupt array, an ``.npz`` archive in place of an array,
a missing array or bytes left over after the last one raise :class:`NpyStreamError` naming the
array. numpy allocates an array's declared size before reading it, but only touches the pages the
body really holds, so a header that lies about its shape costs no memory; the caller's body limit
bounds the rest.
"""
from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import numpy as np

LOG = logging.getLogger(__name__)

__all__ = ["ANSWER_ARRAYS", "MEDIA_TYPE", "SEARCH_ARRAYS", "UPSERT_ARRAYS", "NpyStreamError", "accepts", "dumps",
           "loads"]

MEDIA_TYPE = "application/x-npy"
# the arrays of each body of the service, in order (see faiss_index.service.formats for their dtypes)
SEARCH_ARRAYS = ("vectors", "labels")  # POST /v1/search, with k as a query parameter
ANSWER_ARRAYS = ("ids", "labels", "distances", "keys")  # its answer
UPSERT_ARRAYS = ("ids", "vectors", "labels")  # POST /v1/upsert, then "keys", optional
_MAX_HEADER = 10_000  # bytes of one array's header (numpy's default limit for untrusted files)


class NpyStreamError(ValueError):
    """A body that is not the expected arrays; ``field`` names the array at fault ("body" for the whole)."""

    def __init__(self, field: str, msg: str):
        self.field = field
        super().__init__(msg)


def dumps(*arrays: np.ndarray) -> bytes:
    """The arrays one after another in ``.npy`` format (``np.save`` each, without pickles)."""
    buf = io.BytesIO()
    for a in arrays:
        np.save(buf, np.asarray(a), allow_pickle=False)
    return buf.getvalue()


def loads(body: bytes, names: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Read the arrays ``names`` (all needed) then ``optional`` (each present or not, in order) from ``body``.

    Returns {name: array} in body order; raises NpyStreamError for anything else in the body.
    """
    f = io.BytesIO(body)
    size = len(body)
    out: dict[str, np.ndarray] = {}
    for i, name in enumerate([*names, *optional]):
        if f.tell() == size:
            if i >= len(names):
                break
            what = "the body is empty" if i == 0 else f"the body ends after {', '.join(names[:i])}"
            raise NpyStreamError(name, f"{what}; expected the arrays {', '.join(names)} in .npy format, one "
                                       "after another (np.save each into one buffer).")
        out[name] = _load_one(f, name)
    if f.tell() != size:
        raise NpyStreamError("body", f"{size - f.tell()} byte(s) follow the last expected array "
                                     f"({', '.join([*names, *optional])}).")
    return out


def _load_one(f: io.BytesIO, name: str) -> np.ndarray:
    start = f.tell()
    magic = f.read(6)
    if magic != b"\x93NUMPY":  # np.load would also open a zip or pickle here: only .npy is taken
        what = " but a zip (.npz) archive" if magic.startswith(b"PK") else ""
        raise NpyStreamError(name, f"{name} is not in .npy format{what} (no \\x93NUMPY magic at byte {start}).")
    f.seek(start)
    try:
        a = np.load(f, allow_pickle=False, max_header_size=_MAX_HEADER)
    except ValueError as exc:
        msg = str(exc)
        if "pickle" in msg or "bject" in msg:
            msg = "it holds Python objects, which this service never unpickles; send numbers"
        raise NpyStreamError(name, f"{name} could not be read as .npy: {msg[:200]}.") from None
    except (EOFError, OSError, SyntaxError, TypeError, MemoryError, OverflowError) as exc:
        raise NpyStreamError(name, f"{name} is a corrupt or truncated .npy array ({type(exc).__name__}).") from None
    return a


def accepts(accept_header: str | None) -> bool:
    """Whether an HTTP Accept header asks for :data:`MEDIA_TYPE` (JSON is the default otherwise)."""
    if not accept_header:
        return False
    return any(part.split(";", 1)[0].strip().lower() == MEDIA_TYPE for part in accept_header.split(","))
