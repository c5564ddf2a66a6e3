"""GPU plumbing for faiss: resources, shard placement, and zero-copy calls with torch CUDA tensors.

Everything here runs only with ``device="cuda"`` and a faiss GPU build; it is exercised by the
tests marked ``gpu`` (skipped without CUDA). Calls go through the SWIG entry points with pointers
from ``faiss.contrib.torch_utils`` so CUDA tensors are read in place on the index's stream.
"""
from __future__ import annotations

import contextlib
import logging
from types import ModuleType

import torch

from .faiss_lib import gpu_count

LOG = logging.getLogger(__name__)

__all__ = ["GpuContext"]


class GpuContext:
    """faiss GPU resources per GPU and the placement of class shards on GPUs.

    Args:
        faiss: the faiss module (GPU build).
        device: the index's CUDA device (queries and the store live there).
        spread: place shard i on GPU i % ngpu over all visible GPUs instead of only ``device``.
    """

    def __init__(self, faiss: ModuleType, device: torch.device, spread: bool):
        import faiss.contrib.torch_utils as tu  # noqa: PLC0415 - patches faiss to accept torch tensors

        self.faiss = faiss
        self.tu = tu
        self.device = device
        n = gpu_count(faiss)
        self.gpus = list(range(n)) if spread and n > 1 else [device.index or 0]
        self._res: dict[int, object] = {}
        if len(self.gpus) > 1:
            LOG.info("class shards spread over GPUs %s", self.gpus)

    def resources(self, gpu: int):
        if gpu not in self._res:
            self._res[gpu] = self.faiss.StandardGpuResources()
        return self._res[gpu]

    def place(self, shard_no: int) -> int:
        """GPU of the shard_no-th shard."""
        return self.gpus[shard_no % len(self.gpus)]

    def to_gpu(self, cpu_index, gpu: int, float16_luts: bool = False):
        """Copy a CPU index (IVF, flat, HNSW-CAGRA) to a GPU."""
        co = self.faiss.GpuClonerOptions()
        co.useFloat16 = float16_luts  # IVF-PQ with many sub-quantizers needs half-precision LUTs
        return self.faiss.index_cpu_to_gpu(self.resources(gpu), gpu, cpu_index, co)

    def to_cpu(self, index):
        return self.faiss.index_gpu_to_cpu(index)

    def flat(self, d: int, gpu: int):
        cfg = self.faiss.GpuIndexFlatConfig()
        cfg.device = gpu
        return self.faiss.GpuIndexFlatL2(self.resources(gpu), d, cfg)

    def cagra(self, d: int, gpu: int, graph_degree: int):
        cfg = self.faiss.GpuIndexCagraConfig()
        cfg.device = gpu
        cfg.graph_degree = graph_degree
        cfg.intermediate_graph_degree = 2 * graph_degree
        return self.faiss.GpuIndexCagra(self.resources(gpu), d, self.faiss.METRIC_L2, cfg)

    # -------------------------------------------------------------- zero-copy calls
    @contextlib.contextmanager
    def _on(self, index, gpu: int):
        """Make gpu current and run faiss on torch's current stream there (ordered with torch)."""
        with torch.cuda.device(gpu), self.tu.using_stream(index.getResources()):
            yield

    def add(self, index, x: torch.Tensor, gpu: int) -> None:
        """index.add with a CUDA tensor, read in place (x moved to the index's GPU if needed)."""
        x = x.to(torch.device("cuda", gpu), torch.float32).contiguous()
        with self._on(index, gpu):
            index.add_c(x.shape[0], self.tu.swig_ptr_from_FloatTensor(x))

    def train(self, index, x: torch.Tensor, gpu: int) -> None:
        """index.train with a CUDA tensor (CAGRA builds its graph here)."""
        x = x.to(torch.device("cuda", gpu), torch.float32).contiguous()
        with self._on(index, gpu):
            index.train_c(x.shape[0], self.tu.swig_ptr_from_FloatTensor(x))

    def search(self, index, x: torch.Tensor, k: int, gpu: int, params=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(D, I) of a GPU index for CUDA queries; results come back on x's device."""
        home = x.device
        x = x.to(torch.device("cuda", gpu), torch.float32).contiguous()
        n = x.shape[0]
        D = torch.empty(n, k, dtype=torch.float32, device=x.device)
        I = torch.empty(n, k, dtype=torch.int64, device=x.device)
        with self._on(index, gpu):
            index.search_c(n, self.tu.swig_ptr_from_FloatTensor(x), k, self.tu.swig_ptr_from_FloatTensor(D),
                           self.tu.swig_ptr_from_IndicesTensor(I), params)
        return D.to(home), I.to(home)
