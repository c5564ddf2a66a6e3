"""The service's request and response schema (pydantic), published at ``/docs`` and ``/openapi.json``."""
from __future__ import annotations

import logging
from typing import Annotated

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

LOG = logging.getLogger(__name__)

__all__ = ["SearchRequest", "SearchResponse", "UpsertRequest", "UpsertResponse", "SnapshotRequest",
           "SnapshotResponse", "Health", "IndexInfo", "json_body", "npy_body", "parse"]

_INT64_MAX = (1 << 63) - 1


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


def json_body(model: type[BaseModel], npy: str | None = None) -> dict:
    """An OpenAPI requestBody for a JSON body of ``model`` (for routes that parse their body themselves),
    and, given ``npy`` (the arrays it holds), for the same as ``application/x-npy`` arrays."""
    content = {"application/json": {"schema": model.model_json_schema()}}
    if npy:
        content["application/x-npy"] = npy_body(npy)
    return {"required": True, "content": content}


def npy_body(arrays: str) -> dict:
    """An OpenAPI media-type entry for ``application/x-npy``: ``arrays`` says which, in order."""
    return {"schema": {"type": "string", "format": "binary",
                       "description": f".npy arrays one after another (np.save each into one buffer): {arrays}."}}


def parse(model: type[BaseModel], body: bytes) -> BaseModel:
    """Validate a JSON body; errors become FastAPI's 422 with locations under "body"."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError([{"loc": ("body", *e["loc"]), "msg": e["msg"], "type": e["type"]}
                                      for e in exc.errors(include_url=False, include_input=False)]) from None
