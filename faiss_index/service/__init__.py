"""The search service: a saved index served over HTTP (FastAPI; run it with uvicorn).

:mod:`.app` builds the application from :mod:`.schema` (request and response models), :mod:`.auth`
(bind check, bearer tokens), :mod:`.checks` (request values against the index), :mod:`.formats`
(JSON or ``.npy`` bodies, :mod:`faiss_index.npy_stream`), :mod:`.rwlock`,
:mod:`.middleware` (body limit, access log) and :mod:`.service` (the index behind the routes).
"""
from .app import create_app, open_app
from .auth import check_bind
from .service import Embedder, IndexService, ServiceLimits

__all__ = ["create_app", "open_app", "check_bind", "ServiceLimits", "Embedder", "IndexService"]
