"""Metrics reported in medical imaging papers, computed with scikit-learn."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from nil.config import METRICS as METRIC_KEYS  # the scalar metrics, in report order


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict:
    """Metrics of predicted class probabilities against labels.

    y_true: (N,) int labels in 0..C-1; probs: (N, C) float, rows summing to 1.
    Returns accuracy, balanced_accuracy, macro_f1, auc (binary AUC for two classes, else macro
    one-vs-rest; None when a class is absent from y_true), qwk (quadratic weighted kappa, meaningful
    for ordinal grades such as DR) and the confusion matrix (rows: true class, columns: predicted).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    labels = np.arange(n_classes)
    y_pred = probs.argmax(axis=1)
    present = np.unique(y_true)
    if len(present) < 2:
        auc = None
    elif n_classes == 2:
        auc = float(skm.roc_auc_score(y_true, probs[:, 1]))
    elif len(present) == n_classes:
        auc = float(skm.roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=labels))
    else:
        auc = None
    return {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(skm.f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)),
        "auc": auc,
        "qwk": _kappa(y_true, y_pred, labels),
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "n": int(len(y_true)),
    }


def _kappa(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray) -> float:
    """Quadratic weighted kappa; 0.0 where it is undefined (a single class in truth and prediction)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = skm.cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=labels)
    return float(kappa) if np.isfinite(kappa) else 0.0


def summary(m: dict) -> dict:
    """The scalar metrics only (no confusion matrix), for one-line logs."""
    return {k: m[k] for k in METRIC_KEYS if k in m}
