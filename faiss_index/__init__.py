"""faiss_index: the distractor search engine of nil.

Answers "nearest stored sample of another class" (and "of the same class") for batches of
embeddings that stream in during training. :func:`knn_other_class` is the exact engine (plain
torch, any device); :class:`FaissIndex` is the approximate one (class-sharded faiss structures,
an exact delta for what changed, exact re-ranking from the store). faiss is imported lazily, so
the exact engine works without it.
"""
from .errors import FaissUnavailableError, IndexFormatError, IndexInputError
from .exact import knn_other_class
from .exact_index import ExactIndex
from .approx_index import FaissIndex
from .factory import make_index
from .kinds import KINDS, default_kind
from .persist import index_stats, load_index, save_index
from .result import SearchResult
from .store import VectorStore

__all__ = [
    "IndexInputError", "IndexFormatError", "FaissUnavailableError", "SearchResult", "VectorStore",
    "knn_other_class", "ExactIndex", "FaissIndex", "make_index", "KINDS", "default_kind",
    "save_index", "load_index", "index_stats",
]
