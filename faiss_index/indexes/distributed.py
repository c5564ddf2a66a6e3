"""DistributedIndex: one shard of an index per process, searched together as one index.

Every process of a ``torch.distributed`` group holds a local index (any kind: :class:`ExactIndex`,
:class:`FaissIndex`) over its own share of the samples. A search is collective, every rank calls
it at the same step with its own queries:

1. the queries of every rank (vectors, labels, sample ids) are all-gathered, so each rank holds
   the step's Q_all = sum_r Q_r queries;
2. each rank searches its local shard for all Q_all queries (top-k, with the stored vectors);
3. the per-rank top-k rows go back to the rank that asked (an all-to-all: rank r receives only
   its own Q_r rows from every rank, W * Q_r * k rows in all);
4. each rank merges its W candidate lists by distance, ties broken by the smaller sample id,
   and keeps the first k.

For the exact kind the merged answer equals what :func:`knn_other_class` returns over the union
of the shards (a top-k of a union is the top-k of the per-part top-k's), provided the shards are
disjoint (a sample id stored on one rank only). For approximate kinds each shard's answer is
approximate and the merge keeps the recall of the shards.

:meth:`DistributedIndex.upsert` keeps the shards disjoint without extra traffic: every rank
passes its own batch, the batches of all ranks are the queries just gathered for the search, and
each rank stores the rows it owns (``id % world_size == rank``). :meth:`upsert_local` stores rows
as given, for callers that partition the samples themselves.

Only ``torch.distributed`` is used: gloo for CPU tensors, NCCL for CUDA tensors (the index must
live on the device the process group's backend serves). ``bytes_sent`` counts the payload this
rank put on the wire (padding included), so the cost of a step can be reported.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from ..engines.exact import knn_other_class
from ..result import SearchResult, make_result
from ..validate import as_ids, as_labels, as_queries, as_vectors, check_same_length

LOG = logging.getLogger(__name__)

__all__ = ["DistributedIndex", "merge_topk", "owned_share"]

_NO_ID = torch.iinfo(torch.int64).max  # stands for "no query id": never a stored sample id


def owned_share(index: Any, construct: dict, group: dist.ProcessGroup | None = None) -> Any:
    """This rank's share of a whole index (e.g. one loaded from a folder on every rank).

    A new index of the same kind, made with ``construct`` (the manifest's ``construct``
    arguments), holding the rows with ``id % world_size == rank``: the shard that
    :meth:`DistributedIndex.upsert` keeps up to date afterwards.
    """
    from .factory import make_index

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    vectors, labels, ids = index.store.view()
    mine = ids % world == rank
    local = make_index(index.kind, index.dim, index.num_classes, device=index.device, **construct)
    local.upsert(ids[mine], vectors[mine], labels[mine])
    local.build()
    return local


def merge_topk(distances: torch.Tensor, ids: torch.Tensor, k: int, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The k best of each row of candidate lists, by distance, ties broken by the smaller id.

    distances: (Q, M) float, +inf for a missing candidate; ids: (Q, M) int64, -1 there; others:
    (Q, M, ...) tensors that follow the same order (labels, vectors). Returns the same tensors cut
    to (Q, k), missing candidates last.
    """
    by_id = ids.argsort(dim=1, stable=True)
    d = distances.gather(1, by_id)
    order = by_id.gather(1, d.argsort(dim=1, stable=True))[:, :k]
    out = [distances.gather(1, order), ids.gather(1, order)]
    for t in others:
        idx = order.view(order.shape + (1,) * (t.dim() - 2)).expand(order.shape + t.shape[2:])
        out.append(t.gather(1, idx))
    return tuple(out)


class DistributedIndex:
    """A local index shard plus the collectives that make the shards answer as one index.

    Args:
        local: this rank's index (anything with ``upsert`` and ``search_other_class`` /
            ``search_same_class`` returning a :class:`SearchResult`).
        group: the process group (default: the global group, which must be initialised).
    """

    def __init__(self, local: Any, group: dist.ProcessGroup | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedIndex needs an initialised torch.distributed process group.")
        self.local, self.group = local, group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.bytes_sent = 0
        self._last: tuple | None = None  # this rank's batch and the gathered batches of the last search

    # ------------------------------------------------------------------ what the local index has
    @property
    def kind(self) -> str:
        return self.local.kind

    @property
    def dim(self) -> int:
        return self.local.dim

    @property
    def num_classes(self) -> int:
        return self.local.num_classes

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def store(self):
        """The local shard's store (this rank's samples only)."""
        return self.local.store

    @property
    def last_refresh_s(self):
        return getattr(self.local, "last_refresh_s", 0.0)

    def __len__(self) -> int:
        """Samples in the local shard; :meth:`global_count` sums over ranks."""
        return len(self.local)

    def global_count(self) -> int:
        n = torch.tensor([len(self.local)], dtype=torch.int64, device=self.device)
        dist.all_reduce(n, group=self.group)
        return int(n)

    def take_bytes_sent(self) -> int:
        """Bytes this rank sent since the last call."""
        n, self.bytes_sent = self.bytes_sent, 0
        return n

    # ------------------------------------------------------------------ writing
    def upsert_local(self, ids: Any, vectors: Any, labels: Any) -> torch.Tensor:
        """Store rows in this rank's shard as given (no communication); the caller keeps shards disjoint."""
        return self.local.upsert(ids, vectors, labels)

    def upsert(self, ids: Any, vectors: Any, labels: Any) -> torch.Tensor:
        """Collective: every rank passes its own rows; each keeps those it owns (``id % world_size == rank``).

        ids (B,) int >= 0, vectors (B, D) float, labels (B,) int. When the rows are the queries of
        the last search (the training loop mines, then stores the same batch) the gathered copy is
        reused and nothing is sent. Returns the (U,) rows written in the local store.
        """
        x = as_vectors(vectors, self.dim, self.device, "vectors")
        y = as_labels(labels, self.num_classes, self.device, "labels")
        i = as_ids(ids, self.device, "ids")
        check_same_length(vectors=x, labels=y, ids=i)
        if self._last is not None and _same(self._last[0], (x, y, i)):
            x_all, y_all, i_all = self._last[1]
        else:
            x_all, y_all, i_all, _ = self._gather(x, y, i)
        mine = i_all % self.world_size == self.rank
        return self.local.upsert(i_all[mine], x_all[mine], y_all[mine])

    # ------------------------------------------------------------------ searching
    def search_other_class(self, vectors: Any, labels: Any, k: int = 1, *, query_ids: Any = None,
                           return_vectors: bool = False) -> SearchResult:
        """Collective: nearest samples of another class over every rank's shard.

        Same arguments and result as :meth:`BaseIndex.search_other_class`, for this rank's queries.
        """
        return self._search(vectors, labels, k, query_ids, return_vectors, same_class=False)

    def search_same_class(self, vectors: Any, labels: Any, k: int = 1, *, query_ids: Any = None,
                          return_vectors: bool = False) -> SearchResult:
        """Collective: nearest samples of the same class over every rank's shard."""
        return self._search(vectors, labels, k, query_ids, return_vectors, same_class=True)

    def exact_other_class(self, vectors: Any, labels: Any, k: int = 1, *, query_ids: Any = None) -> SearchResult:
        """Collective: the exact engine over every rank's store (the reference for audits)."""
        def exact(xq, yq, qid, kk, same_class, return_vectors):
            v, y, i = self.local.store.view()
            d, rows = knn_other_class(xq, yq, v, y, kk, qid=qid, bid=i if qid is not None else None)
            s = self.local.store
            return make_result(rows, d, s.vectors, s.labels, s.ids, return_vectors)

        return self._search(vectors, labels, k, query_ids, False, same_class=False, local_search=exact)

    def _local_search(self, xq, yq, qid, k, same_class, return_vectors) -> SearchResult:
        search = self.local.search_same_class if same_class else self.local.search_other_class
        return search(xq, yq, k, query_ids=qid, return_vectors=return_vectors)

    def _search(self, vectors, labels, k, query_ids, return_vectors, same_class, local_search=None) -> SearchResult:
        k, x, y, i = as_queries(vectors, labels, query_ids, k, self.dim, self.num_classes, self.device)
        if i is None:  # -1: no id, for the collectives, which carry ids as int64
            i = torch.full((x.shape[0],), -1, dtype=torch.int64, device=self.device)
        x_all, y_all, i_all, counts = self._gather(x, y, i)
        self._last = ((x, y, i), (x_all, y_all, i_all))
        has_ids = bool((i_all >= 0).any())
        qid = torch.where(i_all >= 0, i_all, torch.full_like(i_all, _NO_ID)) if has_ids else None
        res = (local_search or self._local_search)(x_all, y_all, qid, k, same_class, return_vectors)

        # Send each rank the rows of its own queries; receive W lists of k candidates per query.
        q = x.shape[0]
        dist_part = res.distances.to(torch.float32)
        floats = torch.cat([dist_part, res.vectors.reshape(len(x_all), -1).to(torch.float32)], 1) \
            if return_vectors else dist_part
        ints = torch.cat([res.ids, res.labels], 1)
        got_f = self._exchange(floats.contiguous(), counts, q)
        got_i = self._exchange(ints.contiguous(), counts, q)
        w = self.world_size
        d = got_f[:, :, :k].permute(1, 0, 2).reshape(q, w * k)
        ids = got_i[:, :, :k].permute(1, 0, 2).reshape(q, w * k)
        labs = got_i[:, :, k:].permute(1, 0, 2).reshape(q, w * k)
        if return_vectors:
            vecs = got_f[:, :, k:].reshape(w, q, k, self.dim).permute(1, 0, 2, 3).reshape(q, w * k, self.dim)
            d, ids, labs, vecs = merge_topk(d, ids, k, labs, vecs)
        else:
            d, ids, labs = merge_topk(d, ids, k, labs)
            vecs = None
        return SearchResult(ids=ids, labels=labs, distances=d, vectors=vecs)

    # ------------------------------------------------------------------ collectives
    def _gather(self, x: torch.Tensor, y: torch.Tensor, i: torch.Tensor):
        """All-gather every rank's rows (ranks may hold different numbers); returns them in rank order."""
        n = torch.tensor([x.shape[0]], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n, group=self.group)
        counts = [int(s) for s in sizes]
        top = max(counts)
        xp = x.new_zeros((top, x.shape[1]))
        xp[: x.shape[0]] = x
        ip = torch.full((top, 2), -1, dtype=torch.int64, device=self.device)
        ip[: x.shape[0], 0], ip[: x.shape[0], 1] = y, i
        xs = [torch.empty_like(xp) for _ in range(self.world_size)]
        js = [torch.empty_like(ip) for _ in range(self.world_size)]
        dist.all_gather(xs, xp.contiguous(), group=self.group)
        dist.all_gather(js, ip, group=self.group)
        self.bytes_sent += (self.world_size - 1) * (n.nbytes + xp.nbytes + ip.nbytes)
        x_all = torch.cat([t[:c] for t, c in zip(xs, counts)])
        j_all = torch.cat([t[:c] for t, c in zip(js, counts)])
        return x_all, j_all[:, 0], j_all[:, 1], counts

    def _exchange(self, rows: torch.Tensor, counts: list[int], q: int) -> torch.Tensor:
        """Rows (Q_all, F) in rank order of the queries -> (W, q, F): rank s's rows for this rank's q queries."""
        out = rows.new_empty((self.world_size * q, rows.shape[1]))
        dist.all_to_all_single(out, rows, output_split_sizes=[q] * self.world_size, input_split_sizes=counts,
                               group=self.group)
        own = counts[self.rank]
        self.bytes_sent += (rows.shape[0] - own) * rows.shape[1] * rows.element_size()
        return out.view(self.world_size, q, rows.shape[1])

    def __repr__(self) -> str:
        return f"DistributedIndex(rank={self.rank}, world_size={self.world_size}, local={self.local!r})"


def _same(a: tuple, b: tuple) -> bool:
    return all(s.shape == t.shape and torch.equal(s, t) for s, t in zip(a, b))
