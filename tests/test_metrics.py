import numpy as np
import pytest

from nil.metrics import classification_metrics


def onehot(pred, c):
    p = np.full((len(pred), c), 0.01)
    p[np.arange(len(pred)), pred] = 1.0
    return p / p.sum(1, keepdims=True)


def test_multiclass_metrics_on_a_hand_made_case():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    m = classification_metrics(y, onehot(pred, 3))
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    # per-class F1: c0 p=1/2 r=1/2 -> .5; c1 p=2/3 r=1 -> .8; c2 p=1 r=1/2 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["n"] == 6


def test_qwk_rewards_near_misses_on_ordinal_grades():
    y = np.array([0, 1, 2, 3, 4] * 4)
    near = classification_metrics(y, onehot(np.clip(y + 1, 0, 4), 5))["qwk"]
    far = classification_metrics(y, onehot((y + 3) % 5, 5))["qwk"]
    perfect = classification_metrics(y, onehot(y, 5))["qwk"]
    assert perfect == pytest.approx(1.0)
    assert near > 0.5 > far


def test_binary_auc_uses_the_positive_column():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.35, 0.65], [0.2, 0.8]])
    # positives (0.65, 0.8) vs negatives (0.1, 0.6): all 4 pairs ordered -> AUC 1
    assert classification_metrics(y, probs)["auc"] == pytest.approx(1.0)
    probs[1] = [0.1, 0.9]  # now 0.9 outranks both positives: 2 of 4 pairs ordered
    assert classification_metrics(y, probs)["auc"] == pytest.approx(0.5)


def test_auc_is_none_when_a_class_is_missing():
    y = np.array([0, 0, 0])
    m = classification_metrics(y, onehot(np.array([0, 1, 0]), 2))
    assert m["auc"] is None
    assert m["qwk"] == 0.0 or np.isfinite(m["qwk"])
