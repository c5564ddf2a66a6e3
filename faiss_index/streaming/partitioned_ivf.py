"""Class-partitioned IVF with joint probing: the CPU engine behind kinds "ivf" and "ivfpq".

Each class is a shard with its own coarse quantizer (k-means on that class only), but all shards'
inverted lists live in one faiss IVF container: list ids [offset_c, offset_c + nlist_c) belong to
class c, and every list is class-pure. A query is answered by

1. scoring all lists' centroids with one matrix product (Q x total lists), masking the lists of
   the query's own class (or, for same-class search, of the other classes) and empty lists;
2. taking the ``nprobe`` globally nearest remaining lists -- a joint probe over the shards, so the
   budget goes to the few shards near the query instead of nprobe lists in every shard;
3. one ``search_preassigned`` call over the whole batch, which for "ivfpq" scans 4-bit codes
   with faiss' fast-scan kernels (one dimension per sub-quantizer by default, 64 B per 128-d vector),
   returning ``rerank`` candidates per query for exact re-ranking from the store.

"Other class" is exact by construction: lists of the query's class are never probed.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from ..engines.exact import knn_other_class
from ..errors import IndexInputError
from ..kinds import default_nlist
from ..quantizers.ivf import build_ivf, ivf_nbytes, search_preassigned
from ..quantizers.kmeans import assign, kmeans, seeded_sample
from ..quantizers.pq import encode_pq, pack_codes, pq_errors, pq_mse, train_pq
from .row_lists import RowLists
from .snapshot import Snapshot
from .structure import Engine

LOG = logging.getLogger(__name__)

__all__ = ["PartitionedIVF"]

# Rows sampled to train the PQ codebooks (shared by all classes; codes are not residual).
_PQ_TRAIN_ROWS = 16384
# Retrain the PQ codebook at a refresh when its error on fresh data grew by more than this factor.
_PQ_RETRAIN_RATIO = 1.2
# A periodic refresh retrains the coarse centroids when the rows written since the last one lie, on
# average, this much farther (squared distance) from their nearest centroid than the rows did when
# the centroids were trained (or the PQ codebook's error grew as much); otherwise it is skipped,
# since in-place updates keep the lists exact (see :meth:`PartitionedIVF.fits`).
_DRIFT_RATIO = 1.2
# nprobe calibration (:meth:`PartitionedIVF._calibrate`): stored rows searched exactly per build, rows of
# the store scored at once, and the most lists probed, as a multiple of the default nprobe.
_CALIBRATION_ROWS = 512
_CALIBRATION_CHUNK = 1 << 16
_NPROBE_CAP = 16
# re-rank depth calibration (ivfpq): candidates ranked by the 4-bit codes that are re-ranked exactly,
# at least / at most, in steps of
_RERANK_MIN, _RERANK_CAP, _RERANK_STEP = 32, 256, 16


def _quantile(values: torch.Tensor, q: float) -> int:
    """The smallest v among ``values`` (1-D int) with at least a share q of them <= v."""
    k = max(1, math.ceil(q * values.shape[0]))
    return int(values.sort().values[k - 1])


class PartitionedIVF(Engine):
    """Class-partitioned IVF-Flat ("ivf") or IVF-PQ fast-scan ("ivfpq") on CPU."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.index = None
        self._quantizer = None
        self.centroids = torch.empty(0, self.dim)
        self.list_class = torch.empty(0, dtype=torch.int64)
        self.list_size = torch.empty(0, dtype=torch.int64)
        self._c_sq = torch.empty(0)
        self._bias: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}  # see _class_bias
        self.nlist_per_class = [0] * self.num_classes
        self._pq: dict | None = None  # codebook, its training error, packed codes per row
        self.pq_centroids: torch.Tensor | None = None  # (m, 2**nbits, D // m), encodes in-place updates
        self._lists: RowLists | None = None  # where each row's one entry is; edits the lists in place
        # coarse quantisation error (mean squared distance to the nearest centroid) when the centroids
        # were trained, and the running sums over rows written in place since then, of it and of the
        # PQ reconstruction error (compared with the codebook's own, self._pq["mse"])
        self._err = {"trained": None, "sum": 0.0, "count": 0, "pq_sum": 0.0}
        self._resolve(counts=[0] * self.num_classes)

    # ------------------------------------------------------------------ parameters
    def _lists_per_class(self, counts: list[int]) -> list[int]:
        """Lists per class shard: the user's nlist (capped by the class size) or about sqrt(n_c)."""
        nlist = self.params.nlist
        return [0 if n == 0 else (min(nlist, n) if nlist is not None else default_nlist(n)) for n in counts]

    def _resolve(self, counts: list[int]) -> None:
        p = self.params
        per_class = self._lists_per_class(counts)
        nlist = max(per_class) if any(per_class) else (p.nlist or 1)
        m = p.m if p.m is not None else self.dim
        nbits = p.nbits if p.nbits is not None else 4
        if self.kind == "ivfpq" and self.dim % m:
            raise IndexInputError(f"m={m} must divide the dimension {self.dim}.")
        # Joint probe budget, measured with benchmarks/probe_mining.py (9 classes, 1M x 128-d,
        # nlist 256 per class): total probes 16 / 24 / 32 gave recall@1 0.965 / 0.981 / 0.989;
        # at 100k (nlist 128) 24 probes gave 0.972.
        nprobe = p.nprobe if p.nprobe is not None else max(24, -(-nlist // 10))
        # Re-rank depth: 4-bit codes rank coarsely, so recall is bound by how many candidates are
        # re-ranked exactly, not by nprobe. nil bench stream (1M x 128, 9 classes, two refresh cycles):
        # rerank 32 -> recall@1 0.957 (clusters) / 0.856 (class-pure); 128 -> 0.995 / 0.968. On the
        # class-pure set (24 batches of 256, searches alone, 2 cores): nprobe 26 / rerank 128 -> 0.966
        # in 23.5 ms, nprobe 48 / 128 -> 0.970 in 28.5 ms, 26 / 192 -> 0.979 in 24.8 ms, 26 / 256 ->
        # 0.987 in 27.5 ms: depth is the cheap lever, and 192 leaves headroom over 0.97.
        # Without probe_recall (0) the fixed depth stays; with it each build calibrates the depth from
        # the data (:meth:`_calibrate_depth`): 48 on 100k rows of clusters, 224 on 1M class-pure ones (stream.md).
        rerank = p.rerank if p.rerank is not None else (192 if self.kind == "ivfpq" else 8)
        self.resolved = {"nlist": nlist, "nlist_per_class": per_class, "nprobe": nprobe, "rerank": rerank,
                         "niter": p.niter, "max_points_per_centroid": p.max_points_per_centroid,
                         "seed": p.seed, "probe": "joint"}
        if self.kind == "ivfpq":
            self.resolved.update({"m": m, "nbits": nbits, "fast_scan": nbits == 4, "by_residual": False})

    # ------------------------------------------------------------------ build
    def build(self, vectors: torch.Tensor, labels: torch.Tensor, changed: torch.Tensor | None = None) -> None:
        self.build_prepared(self.prepare(vectors, labels, changed))

    def prepare(self, vectors: torch.Tensor, labels: torch.Tensor, changed: torch.Tensor | None = None) -> dict:
        """What a build reads, fixed now: the labels and which rows changed since the last build
        (two cheap copies), and the vectors as a :class:`Snapshot` of the live store, so starting a
        background rebuild costs a training step almost nothing and the build sees the store
        exactly as it is here. A background caller saves each row into ``job["snapshot"]`` before
        writing it; the index writes those rows into the new structure after it is built.
        """
        return {"snapshot": Snapshot(vectors.detach()), "labels": labels.detach().to("cpu").clone(),
                "changed": None if changed is None else changed.detach().cpu().clone()}

    def fits(self, labels: torch.Tensor) -> bool:
        """Whether a periodic refresh can be skipped: the structure is built and holds one entry for
        every stored row (in-place updates keep it so), each class keeps its number of lists, the rows
        written since the centroids were trained are not farther from them than ``_DRIFT_RATIO`` times
        the training error, and their PQ reconstruction error has not grown as much either. Costs a
        label count, nothing more: the errors are summed as rows are written."""
        n = labels.shape[0]
        if not self.built or self._lists is None or self._err["trained"] is None or self.index.ntotal != n:
            return False
        counts = torch.bincount(labels.cpu(), minlength=self.num_classes).tolist()
        if self._lists_per_class(counts) != list(self.nlist_per_class):
            return False
        e = self._err
        if not e["count"]:
            return True
        if e["sum"] / e["count"] > _DRIFT_RATIO * e["trained"]:
            return False
        return self._pq is None or e["pq_sum"] / e["count"] <= _PQ_RETRAIN_RATIO * self._pq["mse"]

    def build_prepared(self, job: dict) -> None:
        """Build from :meth:`prepare`'s snapshot (safe to run in a thread while searches use another copy).

        The centroids are trained (k-means, from the previous ones at a refresh) and every row is
        assigned to the nearest list of its class.
        """
        snap, labels = job["snapshot"], job["labels"]
        counts = torch.bincount(labels, minlength=self.num_classes).tolist()
        self._resolve(counts)
        r = self.resolved
        rows_of = [(labels == c).nonzero().squeeze(1) for c in range(self.num_classes)]
        old_cent, old_nlist = self.centroids, self.nlist_per_class
        cents, list_class, nlists = [], [], []
        list_no = torch.empty(labels.shape[0], dtype=torch.int64)
        offset = 0
        old_offset = 0
        err_sum = 0.0
        for c in range(self.num_classes):
            nl = r["nlist_per_class"][c]
            prev_nl = old_nlist[c] if c < len(old_nlist) else 0
            init = old_cent[old_offset:old_offset + prev_nl] if prev_nl == nl and nl else None
            old_offset += prev_nl
            nlists.append(nl)
            if not nl:
                continue
            rows_c = rows_of[c]
            pick = seeded_sample(counts[c], r["max_points_per_centroid"] * nl, r["seed"] + 7919 * c)
            sample = snap.read(rows_c[pick])
            # A refresh starts from the previous centroids, so fewer iterations suffice.
            niter = r["niter"] if init is None else max(4, r["niter"] // 3)
            cent = kmeans(sample, nl, niter=niter, seed=r["seed"] + c, init=init)
            a, d = assign(snap.read(rows_c), cent)
            list_no[rows_c] = a + offset
            err_sum += float(d.sum())
            cents.append(cent)
            list_class.append(torch.full((nl,), c, dtype=torch.int64))
            offset += nl
        self.nlist_per_class = nlists
        if offset == 0:
            self.index, self._quantizer, self.built, self.ntotal = None, None, False, 0
            self.centroids = torch.empty(0, self.dim)
            return
        self.centroids = torch.cat(cents)
        self.list_class = torch.cat(list_class)
        self._c_sq = (self.centroids * self.centroids).sum(1)
        self._bias = {}  # a new dict: a copy of this engine searching meanwhile keeps its own
        self._err = {"trained": err_sum / max(1, labels.shape[0]), "sum": 0.0, "count": 0, "pq_sum": 0.0}
        self._fill(job, list_no)
        self.resolved = {**r, "nlist_total": offset}
        self._calibrate(snap, labels, list_no)

    def _calibrate(self, snap: Snapshot, labels: torch.Tensor, list_no: torch.Tensor) -> None:
        """Choose nprobe from the data: the fewest lists (at least the default, at most
        ``_NPROBE_CAP`` times it) that hold the exact nearest other-class row of ``probe_recall`` of a
        seeded sample of stored rows, each searched as a query. How far the default falls short
        depends on the embeddings: synthetic clusters need about 26 lists, a trained network's more
        (see ``probe_mining.md``). Costs one exact search of the sample over the snapshot, in the
        build's thread. Sets ``resolved["nprobe"]`` and the sample's share found at it.
        """
        r, target = self.resolved, float(self.params.probe_recall)
        depth = self.kind == "ivfpq" and self.params.rerank is None
        if target <= 0 or (self.params.nprobe is not None and not depth):
            return
        n = labels.shape[0]
        rows = seeded_sample(n, _CALIBRATION_ROWS, r["seed"] + 3)
        xq, yq = snap.read(rows), labels[rows]
        best_d = torch.full((rows.shape[0],), float("inf"))
        best_i = torch.full((rows.shape[0],), -1, dtype=torch.int64)
        for s in range(0, n, _CALIBRATION_CHUNK):
            ids = torch.arange(s, min(n, s + _CALIBRATION_CHUNK))
            d, i = knn_other_class(xq, yq, snap.read(ids), labels[ids], 1, qid=rows, bid=ids)
            better = d[:, 0] < best_d
            best_d[better], best_i[better] = d[better, 0], i[better, 0] + s
        has = best_i >= 0
        if not bool(has.any()):
            return
        xq, yq, best_i = xq[has], yq[has], best_i[has]
        score = self._list_scores(xq, yq, same_class=False)
        truth = score.gather(1, list_no[best_i].unsqueeze(1))
        needed = (score < truth).sum(1) + 1  # lists probed up to and including the true row's list
        if self.params.nprobe is None:
            want = _quantile(needed, target)
            nprobe = min(max(r["nprobe"], want), _NPROBE_CAP * r["nprobe"], int(self.list_size.gt(0).sum()))
            r["nprobe"] = nprobe
            r["probe_recall_sampled"] = round(float((needed <= nprobe).float().mean()), 4)
            if want > nprobe:
                LOG.info("nprobe %d (the cap) finds the nearest other-class row's list for %.3f of %d sampled rows, "
                         "below probe_recall %.3f", nprobe, r["probe_recall_sampled"], needed.shape[0], target)
        probed = needed <= r["nprobe"]
        if depth and bool(probed.any()):
            self._calibrate_depth(xq[probed], yq[probed], best_i[probed], target)

    def _calibrate_depth(self, xq: torch.Tensor, yq: torch.Tensor, truth: torch.Tensor, target: float) -> None:
        """Choose the re-rank depth from the data: the fewest candidates (a multiple of ``_RERANK_STEP`` in
        [``_RERANK_MIN``, ``_RERANK_CAP``]) among which the 4-bit codes rank the exact nearest other-class
        row of ``target`` of the sampled rows whose true row is in a probed list. The codes rank
        coarsely, and how coarsely depends on the data: in the searches of 1,024 moved rows that chose
        this design, 48 candidates held 99% of the true rows on 100k rows of clusters, 214-264 on 1M
        class-pure rows. Sets ``resolved["rerank"]`` and the share of those sampled rows found within it."""
        r = self.resolved
        _, cand = self._scan(xq, yq, False, _RERANK_CAP)
        hit = cand == truth.unsqueeze(1)
        # candidates up to and including the true row; past the cap when the codes rank it lower
        needed = torch.where(hit.any(1), hit.to(torch.int8).argmax(1) + 1, _RERANK_CAP + 1)
        want = -(-_quantile(needed, target) // _RERANK_STEP) * _RERANK_STEP
        r["rerank"] = min(max(_RERANK_MIN, want), _RERANK_CAP)
        r["rerank_recall_sampled"] = round(float((needed <= r["rerank"]).float().mean()), 4)
        if want > _RERANK_CAP:
            LOG.info("re-rank depth %d (the cap) holds the nearest other-class row for %.3f of %d sampled rows, "
                     "below probe_recall %.3f", _RERANK_CAP, r["rerank_recall_sampled"], needed.shape[0], target)

    def _fill(self, job: dict, list_no: torch.Tensor) -> None:
        """Write every row of the snapshot into list ``list_no[row]`` of a new faiss index over the
        current centroids (codes from the per-row cache where they are still valid)."""
        faiss, r = self.faiss, self.resolved
        snap, labels = job["snapshot"], job["labels"]
        ids = torch.arange(labels.shape[0], dtype=torch.int64)
        pq_cent = None
        if self.kind == "ivf":
            index, quantizer = build_ivf(faiss, "ivf", snap.read(), self.centroids, list_no, ids)
        else:
            pick = seeded_sample(labels.shape[0], _PQ_TRAIN_ROWS, r["seed"] + 1)
            pq_cent, codes = self._codes_for(snap, job["changed"], snap.read(pick))
            index, quantizer = build_ivf(faiss, "ivfpq", snap.vectors, self.centroids, list_no, ids, m=r["m"],
                                         nbits=r["nbits"], pq_centroids=pq_cent, codes=codes,
                                         fast_scan=r["nbits"] == 4)
        self._lists = RowLists(faiss, index, labels.shape[0])
        self.list_size = torch.from_numpy(self._lists.sizes)  # shares memory: in-place edits keep it current
        self.index, self._quantizer = index, quantizer
        self.ntotal = int(labels.shape[0])
        self.pq_centroids = pq_cent
        self.built = True

    # ------------------------------------------------------------------ in-place updates
    def update(self, rows: torch.Tensor, vectors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Write changed store rows into the built structure now, so no exact delta grows.

        Each row's new vector goes to the nearest list of its (new) class -- the centroids are
        not retrained, that is what a refresh is for -- with its PQ code from the current codebook:
        rewritten in place when that is the list it was in, otherwise moved there (see
        :class:`RowLists`). Every row keeps exactly one entry.

        rows (U,) int64 unique store rows; vectors (U, D); labels (U,). Returns the rows that could not
        be placed (their class had no rows at the last build, so it has no lists), for the exact delta;
        their old entries are removed.
        """
        if not self.built or rows.numel() == 0:
            return rows[:0] if self.built else rows
        rows_cpu, labels = rows.to("cpu"), labels.to("cpu")
        x = vectors.to("cpu", torch.float32)
        list_no = torch.full((rows_cpu.shape[0],), -1, dtype=torch.int64)
        offsets = [0]
        for nl in self.nlist_per_class:
            offsets.append(offsets[-1] + nl)
        for c in labels.unique().tolist():
            lo, hi = offsets[c], offsets[c + 1]
            if hi == lo:
                continue
            sel = (labels == c).nonzero().squeeze(1)
            a, d = assign(x[sel], self.centroids[lo:hi], self._c_sq[lo:hi])
            list_no[sel] = a + lo
            self._err["sum"] += float(d.sum())
            self._err["count"] += int(d.shape[0])
        placed = list_no >= 0
        if not placed.all():
            self._lists.remove(rows_cpu[~placed].numpy())
            rows_cpu, x, list_no = rows_cpu[placed], x[placed], list_no[placed]
        if rows_cpu.numel():
            if self.kind == "ivf":
                codes = np.ascontiguousarray(x.numpy()).view(np.uint8)
            else:
                raw = encode_pq(x, self.pq_centroids)
                self._err["pq_sum"] += float(pq_errors(x, raw, self.pq_centroids).sum())
                codes = pack_codes(raw, self.resolved["nbits"])
                if self._pq is not None:  # keep the cached codes current, so the next refresh reuses them
                    cache = self._pq["codes"]
                    inside = rows_cpu < cache.shape[0]
                    cache[rows_cpu[inside].numpy()] = codes[inside.numpy()]
            self._lists.write(rows_cpu.numpy(), list_no.numpy(), codes)
            self.ntotal = max(self.ntotal, int(rows_cpu.max()) + 1)
        return rows[~placed.to(rows.device)]

    def _codes_for(self, snap: Snapshot, changed: torch.Tensor | None, sample: torch.Tensor):
        """PQ codebook and packed codes (N, code_size) uint8 of every row.

        The codes are not residual, so they do not depend on the coarse lists: while the codebook
        still fits the data (reconstruction error on a fresh seeded sample within 20% of its
        value when trained) it is kept, and only rows changed since the last build are encoded.
        Otherwise it is retrained and everything re-encoded.
        """
        r = self.resolved
        n = snap.n
        cb = dict(self._pq) if self._pq is not None else None  # a copy: another engine may share the old one
        reuse = (cb is not None and changed is not None and cb["shape"] == (r["m"], r["nbits"])
                 and cb["codes"].shape[0] <= n and pq_mse(sample, cb["centroids"]) <= _PQ_RETRAIN_RATIO * cb["mse"])
        if reuse:
            codes = np.empty((n, cb["codes"].shape[1]), dtype=np.uint8)
            old = cb["codes"].shape[0]
            codes[:old] = cb["codes"]
            todo = changed.cpu().clone()
            todo[old:] = True
            # the cache belongs to the structure in use, which the training thread keeps writing:
            # rows written since the snapshot are encoded again from their snapshot values
            todo[snap.saved()[0]] = True
            rows = todo.nonzero().squeeze(1)
            if rows.numel():
                codes[rows.numpy()] = pack_codes(encode_pq(snap.read(rows), cb["centroids"]), r["nbits"])
            cent = cb["centroids"]
        else:
            cent = train_pq(sample, r["m"], r["nbits"], seed=r["seed"])
            codes = pack_codes(encode_pq(snap.vectors, cent), r["nbits"])  # a float16 store is encoded block by block
            rows, old = snap.saved()  # rows written while the line above read the live store
            if rows.numel():
                codes[rows.numpy()] = pack_codes(encode_pq(old, cent), r["nbits"])
            cb = {"centroids": cent, "mse": pq_mse(sample, cent), "shape": (r["m"], r["nbits"])}
        cb["codes"] = codes
        self._pq = cb
        return cent, codes

    # ------------------------------------------------------------------ search
    def candidates(self, xq, yq, same_class, k):
        if not self.built:
            return torch.empty(xq.shape[0], 0), torch.empty(xq.shape[0], 0, dtype=torch.int64)
        return self._scan(xq, yq, same_class, max(self.resolved["rerank"], 2 * k))

    def _scan(self, xq, yq, same_class, kp):
        """The kp nearest rows by their codes in the nprobe nearest allowed lists: (Q, kp) distances, rows."""
        xq = xq.to("cpu", torch.float32).contiguous()
        score = self._list_scores(xq, yq.to("cpu"), same_class)
        nprobe = min(self.resolved["nprobe"], score.shape[1])
        cd, ci = score.topk(nprobe, dim=1, largest=False, sorted=True)
        ci = torch.where(torch.isfinite(cd), ci, torch.full_like(ci, -1))
        cd = cd.masked_fill(~torch.isfinite(cd), 0.0)
        D, I = search_preassigned(self.faiss, self.index, xq.numpy(), kp, ci, cd)
        return torch.from_numpy(D).to(self.device), torch.from_numpy(I).to(self.device)

    def _list_scores(self, xq: torch.Tensor, yq: torch.Tensor, same_class: bool) -> torch.Tensor:
        """(Q, lists) squared distance of each query to each list's centroid, less |q|^2 (the order is
        what counts); +inf for the lists a query must not probe (its own class's, or the other
        classes' for same-class search) and for empty lists."""
        return torch.addmm(self._class_bias(same_class)[yq], xq, self.centroids.T, alpha=-2.0)

    def _class_bias(self, same_class: bool) -> torch.Tensor:
        """(classes, lists): each list's |c|^2, +inf where a query of that class must not probe it.

        One gathered row per query replaces a (Q, lists) mask per search (0.3 of 1.3 ms at 256 x 2,304
        lists). Cached until a list empties or fills (in-place moves change that) or a build."""
        empty = self.list_size == 0
        cached = self._bias.get(same_class)
        if cached is not None and torch.equal(cached[0], empty):
            return cached[1]
        lc = self.list_class.unsqueeze(0)
        classes = torch.arange(self.num_classes).unsqueeze(1)
        excluded = ((lc != classes) if same_class else (lc == classes)) | empty.unsqueeze(0)
        bias = self._c_sq.unsqueeze(0).expand(self.num_classes, -1).masked_fill(excluded, float("inf"))
        self._bias[same_class] = (empty.clone(), bias)
        return bias

    # ------------------------------------------------------------------ size and persistence
    def nbytes(self) -> int:
        if self.index is None:
            return 0
        cached = self._pq["codes"].nbytes if self._pq is not None else 0
        return ivf_nbytes(self.index) + self.centroids.numel() * 4 + cached + self._lists.nbytes()

    def save(self, folder: Path) -> dict:
        if self.index is None:
            return {"files": [], "nlist_per_class": self.nlist_per_class}
        self.faiss.write_index(self.index, str(folder / "ivf.faiss"))
        return {"files": ["ivf.faiss"], "nlist_per_class": self.nlist_per_class, "ntotal": self.ntotal}

    def load(self, folder: Path, meta: dict) -> None:
        self.nlist_per_class = list(meta["nlist_per_class"])
        if not meta["files"]:
            self.index, self.built = None, False
            return
        faiss = self.faiss
        index = faiss.read_index(str(folder / "ivf.faiss"))
        ivf = faiss.extract_index_ivf(index)
        q = faiss.downcast_index(ivf.quantizer)
        self.centroids = torch.from_numpy(q.reconstruct_n(0, q.ntotal).copy())
        self.list_class = torch.cat([torch.full((n,), c, dtype=torch.int64)
                                     for c, n in enumerate(self.nlist_per_class)])
        self._lists = RowLists(faiss, ivf, int(meta["ntotal"]))
        self.list_size = torch.from_numpy(self._lists.sizes)
        self._c_sq = (self.centroids * self.centroids).sum(1)
        self._bias = {}
        self.index, self._quantizer = index, None
        self.pq_centroids = None
        if self.kind == "ivfpq":
            pq = faiss.downcast_index(index).pq
            self.pq_centroids = torch.from_numpy(
                faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub).copy())
        self.ntotal = int(meta["ntotal"])
        self.built = True
        self.resolved["nlist_total"] = int(ivf.nlist)
