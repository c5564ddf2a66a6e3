"""Several processes, one job: process-group setup, rank helpers, DDP wrapping, rank-0 writing.

``torchrun --nproc-per-node N [--nnodes M ...] -m cli train ...`` starts N x M copies of the
command with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment. :func:`setup`
reads them and joins the process group (NCCL for CUDA, gloo for the CPU; each process takes the
GPU ``LOCAL_RANK``). Without them (plain ``nil train``) nothing is initialised and every helper
answers for a single process: rank 0 of 1, so the same code runs both ways.

The group lives until the process exits (torchrun runs one job per process); :func:`teardown`
is registered with :mod:`atexit` by :func:`setup`.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job."""

    rank: int = 0  # global rank, 0..world_size-1
    world_size: int = 1  # processes in the job (all nodes)
    local_rank: int = 0  # rank on this node: the GPU it uses

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """True when started by torchrun (or any launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def context() -> Context:
    """The current process's :class:`Context` (rank 0 of 1 when no group is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: torch.device) -> tuple[Context, torch.device]:
    """Join the process group torchrun describes; return the context and this process's device.

    ``device`` is the device the single-process run would use: with CUDA each process takes
    ``cuda:LOCAL_RANK`` and the NCCL backend, on the CPU gloo. A no-op (rank 0 of 1, ``device``
    unchanged) when not launched by torchrun; safe to call again once initialised.
    """
    if not launched():
        return Context(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        atexit.register(teardown)
        LOG.info("rank %d of %d joined the %s group (device %s)", dist.get_rank(), dist.get_world_size(),
                 backend, device)
    return context(), device


def teardown() -> None:
    """Leave the process group, if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if context().distributed:
        dist.barrier()


def is_main() -> bool:
    """True on rank 0 and in a single process: the process that writes and prints."""
    return context().is_main


def on_main(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Call ``fn`` on rank 0 only (None elsewhere): for files every rank would otherwise write."""
    return fn(*args, **kwargs) if is_main() else None


def agree(ok: bool, device: torch.device | str = "cpu") -> bool:
    """True when ``ok`` holds on every rank (a collective), so all ranks take the same branch."""
    if not context().distributed:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag)
    return int(flag) == 0


def sum_over_ranks(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum of a list of numbers over every rank (identity for a single process)."""
    if not context().distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects; identity for a single process)."""
    if not context().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_model(model: nn.Module, device: torch.device, find_unused: bool = True) -> nn.Module:
    """The module to train with: ``model`` itself in one process, else DDP around it.

    On CUDA the BatchNorm layers are converted to SyncBatchNorm *inside* ``model`` (so ``model``
    stays the unwrapped network for saving, evaluation and the gradient distractor): statistics
    over the global batch, as one process with the same global batch computes them. PyTorch's
    SyncBatchNorm runs on GPUs only, so on the CPU (gloo) each rank normalises with the
    statistics of its own slice of the batch. ``find_unused``: some parameters may get no
    gradient in a step (the projection head while the distractor term is off: cross-entropy
    runs, warm-up epochs), which DDP must be told.
    """
    if not context().distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        _convert_sync_bn(model)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (the module itself otherwise)."""
    return getattr(model, "module", model)


def _convert_sync_bn(model: nn.Module) -> None:
    """Replace every BatchNorm child of ``model`` by a SyncBatchNorm, keeping ``model`` the same object."""
    for name, child in model.named_children():
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(child)
        if converted is not child:
            setattr(model, name, converted)


def sum_fields(obj: Any, names: tuple[str, ...], device: torch.device | str = "cpu") -> Any:
    """``obj`` with the numeric attributes ``names`` summed over every rank (a collective)."""
    if not context().distributed:
        return obj
    total = sum_over_ranks([float(getattr(obj, n)) for n in names], device)
    for n, v in zip(names, total):
        setattr(obj, n, type(getattr(obj, n))(v))
    return obj


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """The batch each of ``world_size`` processes loads; ``--batch-size`` is the global batch."""
    from nil.errors import NilError

    if global_batch % world_size:
        raise NilError(f"--batch-size {global_batch} is the global batch and must divide evenly over "
                       f"{world_size} processes")
    return global_batch // world_size
