"""Distractor-aware losses.

For sample i with embedding z_i and its distractor's stored embedding m_d(i) (the nearest stored
sample of another class), the default ("margin") term is

    L_d = mean_i max(0, margin - ||z_i - m_d(i)||)^2

and the "triplet" variant uses the nearest same-class stored sample m_p(i) as well:

    L_t = mean_i max(0, ||z_i - m_p(i)|| - ||z_i - m_d(i)|| + margin)

The total loss is L = CE + lambda * L_d (or L_t). Samples without a distractor (id -1) or, for
the triplet, without a positive, contribute nothing; the mean is over the samples that do.
"""

from __future__ import annotations

import torch
from torch import nn

from nil.config import VARIANTS



def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    count = valid.sum()
    if count == 0:
        return values.sum() * 0.0  # keeps the graph and the device
    return (values * valid).sum() / count


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Euclidean distance with a finite gradient at zero distance."""
    return ((a - b).pow(2).sum(dim=1) + 1e-12).sqrt()


class DistractorLoss(nn.Module):
    """Push each embedding at least ``margin`` away from its distractor.

    ``forward(z, distractor, valid, positive=None, positive_valid=None)``: ``z`` (B, D) with grad,
    ``distractor``/``positive`` (B, D) stored embeddings (detached), ``valid`` (B,) bool.
    """

    def __init__(self, margin: float = 0.5, variant: str = "margin"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}: choose one of {VARIANTS}")
        self.margin, self.variant = margin, variant

    def forward(
        self,
        z: torch.Tensor,
        distractor: torch.Tensor,
        valid: torch.Tensor,
        positive: torch.Tensor | None = None,
        positive_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        d_neg = _distance(z, distractor)
        if self.variant == "margin":
            return _masked_mean((self.margin - d_neg).clamp(min=0).pow(2), valid.float())
        if positive is None or positive_valid is None:
            raise ValueError("the triplet variant needs positives")
        d_pos = _distance(z, positive)
        return _masked_mean((d_pos - d_neg + self.margin).clamp(min=0), (valid & positive_valid).float())
