"""Slots for new keys, and geometric growth of the row tensors and lookup tables of the store and the delta."""
from __future__ import annotations

import logging

import torch

LOG = logging.getLogger(__name__)

__all__ = ["grow_table", "grow_rows", "assign_slots"]


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
              fills: tuple[float | int | None, ...], exact: bool = False) -> tuple[torch.Tensor, ...]:
    """Tensors sharing a first dimension (capacity), doubled until they hold n rows (``exact``: n rows).

    The first ``used`` rows are kept; new rows are filled with the matching ``fills`` entry (None:
    left uninitialised). Returned unchanged when n fits.
    """
    cap = tensors[0].shape[0]
    if n <= cap:
        return tensors
    while cap < n and not exact:
        cap *= 2
    cap = n if exact else cap
    out = []
    for old, fill in zip(tensors, fills):
        shape = (cap, *old.shape[1:])
        new = (torch.empty(shape, dtype=old.dtype, device=old.device) if fill is None
               else torch.full(shape, fill, dtype=old.dtype, device=old.device))
        new[:used] = old[:used]
        out.append(new)
    return tuple(out)


def assign_slots(slots: torch.Tensor, used: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give keys without a slot the next free ones.

    slots: (B,) int64 slot of each (unique) key, -1 where it has none; used: slots taken so far.
    Returns the completed slots (B,), the mask (B,) bool of keys that were new, and their fresh
    slots ``used, used + 1, ...`` in order (empty when none was new).
    """
    new = slots < 0
    n_new = int(new.sum())
    fresh = torch.arange(used, used + n_new, device=slots.device)
    if n_new:
        slots = slots.clone()
        slots[new] = fresh
    return slots, new, fresh
