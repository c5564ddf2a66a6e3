"""BatchNorm within one training step: the training batch sets the statistics, distractors follow them.

A distractor-aware step may push more than the batch through the network: the images of mined
distractors (``--fresh-distractors``, ``--loss ce-replay``) and the moved features of the gradient
distractor. In plain train mode each of those passes would normalise with its own statistics and
move the running statistics again, with the distractors' class mix (on BreastMNIST about 73% of
distractors are malignant against 27% of the data), and evaluation uses those statistics.

Inside :func:`batch_statistics` every BatchNorm layer in train mode behaves as follows:

- its first call in the step (the training batch) is ordinary training BatchNorm: it normalises
  with the batch's mean and variance and updates the running statistics from them, exactly as
  without the context (same kernel, same numbers);
- every later call in the same step (distractor images, moved features) is normalised with that
  batch's statistics and leaves the running statistics alone: a distractor is embedded as one more
  member of the batch that does not vote in its statistics. Where the later call's output needs a
  gradient (fresh distractor images, hard-example replay), the statistics stay functions of the
  batch, as they are for the batch's own members, so the gradient flows through them.

Why the gradient must flow through the statistics: BatchNorm makes the batch's loss blind to some
directions of the layer before it (a shift or scale of a whole channel). A loss on a later pass
normalised with *constant* statistics is not blind to them: its gradient pushes along directions
the batch's own normalisation then undoes, every step, and Adam turns that steady push into
full-size steps. Measured on BreastMNIST (small CNN, hard-example replay at lambda 0.1): with
constant statistics training stalled at the majority-class rate (train accuracy 0.74, validation
balanced accuracy 0.58 after 8 epochs); with the statistics as functions of the batch it trains
as cross-entropy does (0.87, 0.84).

So the batch and its distractors are embedded consistently, the running statistics are those of
the training data alone, and a pass over a single distractor image cannot fail for want of a
second value per channel. A training batch with one value per channel (one sample at the
projection head) has no batch statistics: it is normalised with the running statistics, which it
does not change (plain PyTorch raises there).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Within the block, BatchNorm layers of ``model`` in train mode take their statistics from their first call."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for m in layers:
        m.forward = _stepwise(m, cache)  # instance attribute: shadows the class's forward until removed
    try:
        yield
    finally:
        for m in layers:
            del m.forward


def _stepwise(m: _BatchNorm, cache: dict):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not m.training or not m.track_running_stats:
            return type(m).forward(m, x)
        first = cache.get(id(m))
        if first is None:
            out, stats = _first_call(m, x)
            cache[id(m)] = (stats, x)
            return out
        (mean, var), batch = first
        if torch.is_grad_enabled() and batch.numel() // batch.shape[1] > 1:  # SyncBatchNorm: this rank's slice
            return _normalise_like(m, x, batch)
        return F.batch_norm(x, mean, var, m.weight, m.bias, False, 0.0, m.eps)

    return forward


def _normalise_like(m: _BatchNorm, x: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """``x`` normalised with the mean and (biased) variance of ``batch``, the gradient flowing into both."""
    dims = [0] + list(range(2, batch.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    b = batch.float()
    mean, var = b.mean(dims), b.var(dims, unbiased=False)
    y = (x.float() - mean.view(shape)) * torch.rsqrt(var + m.eps).view(shape)
    if m.affine:
        y = y * m.weight.view(shape) + m.bias.view(shape)
    return y.to(x.dtype)


def _first_call(m: _BatchNorm, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Ordinary training BatchNorm on the batch, and the (detached) mean and variance it normalised with."""
    if x.numel() // x.shape[1] <= 1:  # one value per channel: no batch statistics exist
        stats = (m.running_mean.clone(), m.running_var.clone())
        return F.batch_norm(x, *stats, m.weight, m.bias, False, 0.0, m.eps), stats
    if isinstance(m, nn.SyncBatchNorm):  # statistics over every rank; distractors follow this rank's slice
        dims = [0] + list(range(2, x.dim()))
        xd = x.detach().float()
        return type(m).forward(m, x), (xd.mean(dims), xd.var(dims, unbiased=False))
    if m.momentum is None:  # cumulative moving average, as nn.BatchNorm computes it
        m.num_batches_tracked.add_(1)
        momentum = 1.0 / float(m.num_batches_tracked)
    else:
        m.num_batches_tracked.add_(1)
        momentum = m.momentum
    out, mean, invstd = torch.ops.aten.native_batch_norm(x, m.weight, m.bias, m.running_mean, m.running_var,
                                                         True, momentum, m.eps)
    var = (invstd.float().pow(-2) - m.eps).clamp(min=0)
    return out, (mean.detach().float(), var.detach())
