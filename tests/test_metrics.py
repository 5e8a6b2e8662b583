"""Metrics against values computed by hand on small fixed predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attnpipe.metrics import (
    classification_metrics,
    confusion,
    expected_calibration_error,
    per_class_report,
)


def test_multiclass_by_hand():
    # true:      0 0 0 1 1 2
    # predicted: 0 0 1 1 2 2
    labels = np.array([0, 0, 0, 1, 1, 2])
    probs = np.array(
        [
            [0.8, 0.1, 0.1],
            [0.6, 0.3, 0.1],
            [0.3, 0.6, 0.1],
            [0.2, 0.7, 0.1],
            [0.1, 0.4, 0.5],
            [0.1, 0.2, 0.7],
        ]
    )
    result = classification_metrics(labels, probs)
    assert result["accuracy"] == pytest.approx(4 / 6)
    # recalls: 2/3, 1/2, 1/1 -> mean
    assert result["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # precision: 2/2, 1/2, 1/2; F1 = 2PR/(P+R): 0.8, 0.5, 2/3
    assert result["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert "roc_auc" not in result and "top5_accuracy" not in result
    assert confusion(labels, probs).tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    rows = per_class_report(labels, probs, ["a", "b", "c"])
    assert [r["support"] for r in rows] == [3, 2, 1]
    assert rows[1]["precision"] == pytest.approx(0.5)


def test_binary_by_hand():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.3, 0.9])
    probs = np.stack([1 - p1, p1], axis=1)
    result = classification_metrics(labels, probs, threshold=0.5)
    # predicted: 0 0 0 1 1 0 1 -> TN=3 FP=1 FN=1 TP=2
    assert result["sensitivity"] == pytest.approx(2 / 3)
    assert result["specificity"] == pytest.approx(3 / 4)
    assert result["accuracy"] == pytest.approx(5 / 7)
    assert result["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    # ROC-AUC: share of (positive, negative) pairs ranked correctly.
    pairs = [(p, n) for p in p1[labels == 1] for n in p1[labels == 0]]
    assert result["roc_auc"] == pytest.approx(sum(p > n for p, n in pairs) / len(pairs))
    # A lower threshold trades specificity for sensitivity.
    loose = classification_metrics(labels, probs, threshold=0.3)
    assert loose["sensitivity"] == 1.0 and loose["specificity"] == pytest.approx(1 / 4)


def test_binary_with_one_class_present_gives_nan_auc():
    probs = np.array([[0.9, 0.1], [0.8, 0.2]])
    assert math.isnan(classification_metrics(np.array([0, 0]), probs)["roc_auc"])


def test_top5_by_hand():
    labels = np.array([0, 5])
    probs = np.full((2, 6), 0.1)
    probs[0] = [0.05, 0.3, 0.2, 0.2, 0.15, 0.1]  # class 0 ranked last: not in top 5
    probs[1] = [0.3, 0.2, 0.2, 0.1, 0.1, 0.1]  # class 5 tied for 4th: in top 5
    probs[1, 5] = 0.11
    assert classification_metrics(labels, probs)["top5_accuracy"] == pytest.approx(0.5)


def test_ece_by_hand():
    # Two confident-and-right, two 60%-confident with one right: ECE = 0.5*0 + 0.5*|0.5-0.6|.
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[1.0, 0.0], [1.0, 0.0], [0.4, 0.6], [0.6, 0.4]])
    probs[2] = [0.4, 0.6]
    probs[3] = [0.6, 0.4]  # predicts 0, true 1, confidence 0.6
    assert expected_calibration_error(labels, probs) == pytest.approx(0.05)
