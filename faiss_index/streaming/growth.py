"""Geometric growth of the row tensors and row-lookup tables of the store and the delta."""
from __future__ import annotations

import logging

import torch

LOG = logging.getLogger(__name__)

__all__ = ["grow_table", "grow_rows"]


def grow_table(table: torch.Tensor, index: int) -> torch.Tensor:
    """A (size,) lookup table doubled until position ``index`` exists; new entries are -1 ("absent")."""
    size = table.shape[0]
    if index < size:
        return table
    while size <= index:
        size *= 2
    grown = torch.full((size,), -1, dtype=table.dtype, device=table.device)
    grown[: table.shape[0]] = table
    return grown


def grow_rows(tensors: tuple[torch.Tensor, ...], used: int, n: int,
              fills: tuple[float | int | None, ...]) -> tuple[torch.Tensor, ...]:
    """Tensors sharing a first dimension (capacity), doubled until they hold n rows.

    The first ``used`` rows are kept; new rows are filled with the matching ``fills`` entry (None:
    left uninitialised). Returned unchanged when n fits.
    """
    cap = tensors[0].shape[0]
    if n <= cap:
        return tensors
    while cap < n:
        cap *= 2
    out = []
    for old, fill in zip(tensors, fills):
        shape = (cap, *old.shape[1:])
        new = (torch.empty(shape, dtype=old.dtype, device=old.device) if fill is None
               else torch.full(shape, fill, dtype=old.dtype, device=old.device))
        new[:used] = old[:used]
        out.append(new)
    return tuple(out)
