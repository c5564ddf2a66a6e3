"""faiss_index: the distractor search engine of nil.

Answers "nearest stored sample of another class" (and "of the same class", for triplet
positives) for batches of embeddings that stream in during training.

* :func:`knn_other_class` -- the exact engine: plain torch on any device, the reference every
  approximate engine is tested against. :class:`ExactIndex` wraps it around a store; it is the
  right choice on a GPU (``default_kind("cuda") == "exact"``).
* :class:`FaissIndex` -- the approximate engine: a :class:`VectorStore` (freshest vector per
  sample id), a faiss structure rebuilt every ``refresh_every`` upserts, an exact delta for rows
  changed since, and exact re-ranking of all candidates from the store. On CPU the IVF kinds use
  class-partitioned lists with joint probing (:mod:`faiss_index.streaming.partitioned_ivf`); ``"ivfpq"``
  (4-bit fast-scan codes + re-rank) is the measured CPU default (``default_kind("cpu")``).
* :func:`save_index` / :func:`load_index` / :func:`verify_index` / :func:`index_stats` -- atomic,
  checksummed folders (:mod:`faiss_index.persistence`, the only code that knows their layout);
  :func:`is_index_dir`, :func:`stored_keys`, :func:`keys_by_id` and the embedding-store writers
  (:func:`create_embeddings`, :func:`write_embedding_rows`) for callers that build or read one.
* :mod:`faiss_index.service` -- a saved index served over HTTP.

Layout: ``engines/`` (the exact torch engine, faiss import, GPU plumbing, one faiss index of any
kind), ``quantizers/`` (k-means, PQ, IVF filling), ``streaming/`` (store, delta, re-ranking, the
rebuilt structures), ``indexes/`` (the index classes and :func:`make_index`), ``persistence/``,
``service/``; ``fileio`` holds fsync and sha256 helpers shared with nil.

faiss is imported lazily, so everything exact works without it; using a faiss kind without
faiss raises :class:`FaissUnavailableError` naming the extra to install.
"""
from .engines.exact import knn_other_class
from .errors import FaissUnavailableError, IndexFormatError, IndexInputError, IndexWriteError
from .fileio import fsync_dir, sha256_file
from .indexes.distributed import DistributedIndex, owned_share
from .indexes.exact_index import ExactIndex
from .indexes.factory import check_params, make_index
from .indexes.faiss_index import FaissIndex
from .kinds import KINDS, default_kind, resolve_kind
from .persistence import (
                          create_embeddings,
                          index_stats,
                          is_index_dir,
                          keys_by_id,
                          load_index,
                          read_embedding_rows,
                          read_manifest,
                          save_index,
                          staging_folder,
                          stored_keys,
                          verify_index,
                          write_embedding_rows,
)
from .result import SearchResult
from .streaming.store import VectorStore

__all__ = [
    "IndexInputError", "IndexFormatError", "IndexWriteError", "FaissUnavailableError", "SearchResult", "VectorStore",
    "knn_other_class", "ExactIndex", "FaissIndex", "make_index", "check_params", "KINDS", "default_kind", "resolve_kind",
    "save_index", "load_index", "index_stats", "verify_index", "DistributedIndex", "owned_share",
    "is_index_dir", "read_manifest", "staging_folder", "create_embeddings", "write_embedding_rows",
    "read_embedding_rows", "stored_keys", "keys_by_id", "sha256_file", "fsync_dir",
]
