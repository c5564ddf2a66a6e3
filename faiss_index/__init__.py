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
* :func:`save_index` / :func:`load_index` / :func:`index_stats` -- atomic, checksummed folders.

faiss is imported lazily, so everything exact works without it; using a faiss kind without
faiss raises :class:`FaissUnavailableError` naming the extra to install.
"""
from .errors import FaissUnavailableError, IndexFormatError, IndexInputError, IndexWriteError
from .engines.exact import knn_other_class
from .indexes.exact_index import ExactIndex
from .indexes.faiss_index import FaissIndex
from .indexes.distributed import DistributedIndex, owned_share
from .indexes.factory import make_index
from .kinds import KINDS, default_kind
from .persistence.save import index_stats, load_index, save_index, verify_index
from .result import SearchResult
from .streaming.store import VectorStore

__all__ = [
    "IndexInputError", "IndexFormatError", "IndexWriteError", "FaissUnavailableError", "SearchResult", "VectorStore",
    "knn_other_class", "ExactIndex", "FaissIndex", "make_index", "KINDS", "default_kind",
    "save_index", "load_index", "index_stats", "verify_index", "DistributedIndex", "owned_share",
]
