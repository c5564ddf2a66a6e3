"""Distractor-aware losses.

For sample i with embedding z_i and its distractor's stored embedding m_d(i) (the nearest stored
sample of another class), the default ("margin") term is

    L_d = mean_i max(0, margin - ||z_i - m_d(i)||)^2

and the "triplet" variant uses the nearest same-class stored sample m_p(i) as well:

    L_t = mean_i max(0, ||z_i - m_p(i)|| - ||z_i - m_d(i)|| + margin)

The total loss is L = CE + lambda * L_d (or L_t). Samples without a distractor (id -1) or, for
the triplet, without a positive, contribute nothing; the mean is over the samples that do.

With class weights (``--term-weighting balanced``: w_c = N / (C * n_c) over the N training samples
of C classes, n_c of class c) sample i's term is multiplied by w_{y_i} before the same mean, so a
rare class pushes away from its distractors as hard, in total, as a common one.
"""

from __future__ import annotations

import torch
from torch import nn

from nil.config import VARIANTS



def _masked_mean(values: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values * weight`` over the valid rows (their count, not their weights, divides)."""
    count = valid.sum()
    if count == 0:
        return values.sum() * 0.0  # keeps the graph and the device
    return (values * valid * (1.0 if weight is None else weight)).sum() / count


def balanced_class_weights(labels, num_classes: int) -> torch.Tensor:
    """w_c = N / (C * n_c) for the N training labels (1 for a class without samples): mean 1 per sample."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.int64), minlength=num_classes).double()
    w = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.ones_like(counts))
    return w.float()


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Euclidean distance with a finite gradient at zero distance."""
    return ((a - b).pow(2).sum(dim=1) + 1e-12).sqrt()


class DistractorLoss(nn.Module):
    """Push each embedding at least ``margin`` away from its distractor.

    ``forward(z, distractor, valid, positive=None, positive_valid=None)``: ``z`` (B, D) with grad,
    ``distractor``/``positive`` (B, D) stored embeddings (detached), ``valid`` (B,) bool; with
    ``class_weight`` (C,) also ``labels`` (B,), each sample's term weighted by its class's weight.
    """

    def __init__(self, margin: float = 0.5, variant: str = "margin", class_weight: torch.Tensor | None = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}: choose one of {VARIANTS}")
        self.margin, self.variant = margin, variant
        self.register_buffer("class_weight", class_weight)

    def forward(
        self,
        z: torch.Tensor,
        distractor: torch.Tensor,
        valid: torch.Tensor,
        positive: torch.Tensor | None = None,
        positive_valid: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        weight = None
        if self.class_weight is not None:
            if labels is None:
                raise ValueError("a class-weighted term needs the batch's labels")
            weight = self.class_weight[labels]
        d_neg = _distance(z, distractor)
        if self.variant == "margin":
            return _masked_mean((self.margin - d_neg).clamp(min=0).pow(2), valid.float(), weight)
        if positive is None or positive_valid is None:
            raise ValueError("the triplet variant needs positives")
        d_pos = _distance(z, positive)
        return _masked_mean((d_pos - d_neg + self.margin).clamp(min=0), (valid & positive_valid).float(), weight)
