"""RowLists: move a stored row's entry between the inverted lists of a CPU faiss IVF index in place.

faiss ids in the class-partitioned IVF are store rows, and every row has at most one entry, at
``(row_list[row], row_pos[row])``. When a row is written again its entry is

- rewritten where it is, when the new vector's nearest list is the old one (the common case:
  training moves an embedding a little);
- otherwise removed from the old list by moving that list's last entry into its slot, and
  appended to the new list.

So the lists never hold an older copy of a row, and nothing needs a rebuild to stay exact; only
the centroids age (a refresh retrains them when the data drifted). Both list layouts are handled:
plain arrays (IVF-Flat, IVF-PQ) through numpy views of their buffers, and the interleaved blocks
of fast-scan IVF-PQ through faiss' code packer.
"""
from __future__ import annotations

import logging
from types import ModuleType

import numpy as np

LOG = logging.getLogger(__name__)

__all__ = ["RowLists"]


class RowLists:
    """Row-addressed edits of the lists of a filled CPU IndexIVF* (faiss id = store row).

    Args:
        faiss: the faiss module; index: the IVF index (its lists are edited in place).
        n: rows to address at first (grows as higher rows are written).
    """

    def __init__(self, faiss: ModuleType, index, n: int):
        self.faiss = faiss
        self.index = index
        self.invlists = index.invlists
        self.packer = getattr(faiss.downcast_InvertedLists(self.invlists), "packer", None)  # fast-scan blocks
        self.code_size = int(index.code_size)
        self.sizes = np.array([self.invlists.list_size(i) for i in range(index.nlist)], dtype=np.int64)
        self.row_list = np.full(n, -1, dtype=np.int32)
        self.row_pos = np.full(n, -1, dtype=np.int32)
        for lno in np.flatnonzero(self.sizes):
            ids = self._ids(lno)
            self.row_list[ids] = lno  # a row listed twice (an index saved by an older version): the last wins
            self.row_pos[ids] = np.arange(ids.shape[0], dtype=np.int32)
        self._buf = np.empty(self.code_size, dtype=np.uint8)

    def nbytes(self) -> int:
        return self.row_list.nbytes + self.row_pos.nbytes + self.sizes.nbytes

    # ------------------------------------------------------------------ raw access
    def _ids(self, lno: int) -> np.ndarray:
        """Writable view of list lno's ids."""
        return self.faiss.rev_swig_ptr(self.invlists.get_ids(int(lno)), int(self.sizes[lno]))

    def _codes(self, lno: int) -> np.ndarray:
        """Writable (size, code_size) view of an array list's codes."""
        n = int(self.sizes[lno])
        return self.faiss.rev_swig_ptr(self.invlists.get_codes(int(lno)), n * self.code_size).reshape(n, self.code_size)

    def _grow(self, n: int) -> None:
        if n <= self.row_list.shape[0]:
            return
        size = max(n, 2 * self.row_list.shape[0])
        for name in ("row_list", "row_pos"):
            old = getattr(self, name)
            new = np.full(size, -1, dtype=np.int32)
            new[:old.shape[0]] = old
            setattr(self, name, new)

    # ------------------------------------------------------------------ edits
    def write(self, rows: np.ndarray, list_no: np.ndarray, codes: np.ndarray) -> None:
        """Give each (unique) row one entry, in list list_no[i] with code codes[i].

        rows, list_no: (U,) int64; codes: (U, code_size) uint8.
        """
        if rows.shape[0] == 0:
            return
        self._grow(int(rows.max()) + 1)
        old = self.row_list[rows].astype(np.int64)
        same = old == list_no
        for i in np.flatnonzero(same):
            self._overwrite(int(list_no[i]), int(self.row_pos[rows[i]]), rows[i], codes[i])
        move = ~same
        self.remove(rows[move & (old >= 0)])
        self._append(rows[move], list_no[move], codes[move])

    def remove(self, rows: np.ndarray) -> None:
        """Drop the entries of rows (those without one are skipped)."""
        rows = rows[rows < self.row_list.shape[0]]
        for row in rows[self.row_list[rows] >= 0]:
            lno, pos = int(self.row_list[row]), int(self.row_pos[row])
            last = int(self.sizes[lno]) - 1
            if pos != last:  # the list's last entry fills the slot
                ids = self._ids(lno)
                moved = ids[last]
                if self.packer is None:
                    codes = self._codes(lno)
                    codes[pos] = codes[last]
                else:
                    block = self.invlists.get_codes(lno)
                    self.packer.unpack_1_c(block, last, self.faiss.swig_ptr(self._buf))
                    self.packer.pack_1_c(self.faiss.swig_ptr(self._buf), pos, block)
                ids[pos] = moved
                self.row_pos[moved] = pos
            self.invlists.resize(lno, last)
            self.sizes[lno] = last
            self.row_list[row] = self.row_pos[row] = -1
            self.index.ntotal -= 1

    def _overwrite(self, lno: int, pos: int, row: int, code: np.ndarray) -> None:
        if self.packer is None:
            self._codes(lno)[pos] = code
        else:
            self.packer.pack_1_c(self.faiss.swig_ptr(np.ascontiguousarray(code)), pos, self.invlists.get_codes(lno))

    def _append(self, rows: np.ndarray, list_no: np.ndarray, codes: np.ndarray) -> None:
        if rows.shape[0] == 0:
            return
        faiss, inv = self.faiss, self.invlists
        order = np.argsort(list_no, kind="stable")
        lists, starts, counts = np.unique(list_no[order], return_index=True, return_counts=True)
        ids = np.ascontiguousarray(rows[order], dtype=np.int64)
        codes = np.ascontiguousarray(codes[order])
        for lno, start, cnt in zip(lists.tolist(), starts.tolist(), counts.tolist()):
            chunk, chunk_ids = codes[start:start + cnt], ids[start:start + cnt]
            o = int(self.sizes[lno])
            if self.packer is None:
                inv.add_entries(lno, cnt, faiss.swig_ptr(chunk_ids), faiss.swig_ptr(chunk))
            else:
                # Fast-scan lists keep codes in interleaved blocks. Their add_entries copies whole blocks
                # past the end of the list when its size is a multiple of the block size in bytes
                # (faiss 1.15), so the list is grown here and the new codes packed in place.
                inv.resize(lno, o + cnt)
                faiss.rev_swig_ptr(inv.get_ids(lno), o + cnt)[o:] = chunk_ids
                block = inv.get_codes(lno)
                for i in range(cnt):
                    self.packer.pack_1_c(faiss.swig_ptr(chunk[i]), o + i, block)
            self.sizes[lno] = o + cnt
            self.row_list[chunk_ids] = lno
            self.row_pos[chunk_ids] = np.arange(o, o + cnt, dtype=np.int32)
        self.index.ntotal += rows.shape[0]
