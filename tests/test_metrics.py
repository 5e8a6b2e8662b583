"""Metrics against values computed by hand on small fixed predictions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from attnpipe.evaluate.inference import flip_tta_numpy
from attnpipe.metrics import (
    calibration_bins,
    classification_metrics,
    confusion,
    expected_calibration_error,
    per_class_report,
)
from attnpipe.predictions import class_log_probabilities


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


def test_macro_and_per_class_by_hand():
    # Same predictions as test_multiclass_by_hand: predicted 0 0 1 1 2 2 for true 0 0 0 1 1 2.
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = [0, 0, 1, 1, 2, 2]
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), predicted] = 0.8
    result = classification_metrics(labels, probs)
    assert result["macro_precision"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    assert result["macro_recall"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    rows = per_class_report(labels, probs, ["a", "b", "c"])
    assert [r["class"] for r in rows] == ["a", "b", "c"]
    assert [r["precision"] for r in rows] == pytest.approx([1, 1 / 2, 1 / 2])
    assert [r["recall"] for r in rows] == pytest.approx([2 / 3, 1 / 2, 1])
    assert [r["f1"] for r in rows] == pytest.approx([0.8, 0.5, 2 / 3])


def test_a_class_missing_from_the_labels_counts_in_macro_but_not_balanced_accuracy():
    labels = np.array([0, 0, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1]])  # 0, 2, 1
    result = classification_metrics(labels, probs)
    assert result["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)  # classes 0 and 1
    assert result["macro_recall"] == pytest.approx((1 / 2 + 1 + 0) / 3)  # class 2 counts as 0
    assert result["macro_precision"] == pytest.approx((1 + 1 + 0) / 3)


def test_binary_pr_auc_and_per_class_at_the_threshold_by_hand():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.3, 0.9])
    probs = np.stack([1 - p1, p1], axis=1)
    # Ranked by score: 0.9+ 0.8- 0.7+ 0.4- 0.35- 0.3+ 0.1-; average precision is the mean, over
    # the positives, of the precision at their rank: (1/1 + 2/3 + 3/6) / 3.
    assert classification_metrics(labels, probs)["pr_auc"] == pytest.approx((1 + 2 / 3 + 0.5) / 3)
    # threshold 0.5: TN=3 FP=1 FN=1 TP=2
    negative, positive = per_class_report(labels, probs, ["benign", "malignant"], 0.5)
    assert positive["precision"] == pytest.approx(2 / 3) and positive["recall"] == 2 / 3
    assert negative["precision"] == pytest.approx(3 / 4) and negative["recall"] == 3 / 4
    assert (negative["support"], positive["support"]) == (4, 3)
    # threshold 0.3: everything but 0.1 is positive -> TP=3 FP=3 TN=1
    negative, positive = per_class_report(labels, probs, ["benign", "malignant"], 0.3)
    assert positive["precision"] == pytest.approx(1 / 2) and positive["recall"] == 1
    assert negative["precision"] == 1 and negative["recall"] == pytest.approx(1 / 4)
    assert confusion(labels, probs, 0.3).tolist() == [[1, 3], [0, 3]]


def test_no_top5_with_five_classes():
    probs = np.full((2, 5), 0.2)
    probs[:, 0] = 0.2001
    assert "top5_accuracy" not in classification_metrics(np.array([0, 4]), probs)


def test_ece_over_several_bins_by_hand():
    # Confidences 0.9 (right), 0.9 (wrong), 0.5 (right), 0.7 (right), 0.7 (right):
    # bins of 0.9: acc 1/2 vs 0.9; of 0.5: acc 1 vs 0.5; of 0.7: acc 1 vs 0.7.
    probs = np.array(
        [
            [0.9, 0.05, 0.05],
            [0.9, 0.05, 0.05],
            [0.5, 0.3, 0.2],
            [0.1, 0.7, 0.2],
            [0.1, 0.2, 0.7],
        ]
    )
    labels = np.array([0, 1, 0, 1, 2])
    expected = 2 / 5 * abs(0.5 - 0.9) + 1 / 5 * abs(1 - 0.5) + 2 / 5 * abs(1 - 0.7)
    assert expected_calibration_error(labels, probs) == pytest.approx(expected)  # 0.38
    # Three bins, (0, 1/3], (1/3, 2/3], (2/3, 1]: the 0.7s and 0.9s share the last.
    confidence, accuracy, counts = calibration_bins(labels, probs, bins=3)
    assert counts.tolist() == [0, 1, 4]
    assert confidence[1:] == pytest.approx([0.5, (0.9 + 0.9 + 0.7 + 0.7) / 4])
    assert accuracy[1:] == pytest.approx([1, 3 / 4])
    assert np.isnan(accuracy[0]) and np.isnan(confidence[0])
    assert expected_calibration_error(labels, probs, bins=3) == pytest.approx(
        1 / 5 * 0.5 + 4 / 5 * abs(3 / 4 - 0.8)
    )
    # A perfectly confident, always-right model is perfectly calibrated.
    assert expected_calibration_error(np.array([0, 1]), np.eye(2)) == 0


class _LeftMinusRight(torch.nn.Module):
    """Logits (left column sum, right column sum): mirroring the image swaps them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[..., 0].sum((1, 2)), x[..., -1].sum((1, 2))], dim=1)


def test_flip_tta_by_hand():
    image = torch.tensor([[[[1.0, 0.0]]]])  # N=1, C=1, 1 x 2: bright on the left
    model = _LeftMinusRight()
    e = math.e
    once = class_log_probabilities(model, image)[0].exp().tolist()
    assert once == pytest.approx([e / (1 + e), 1 / (1 + e)])
    # The mirror predicts the opposite, so the average is exactly undecided.
    both = class_log_probabilities(model, image, flip_tta=True)[0].exp().tolist()
    assert both == pytest.approx([0.5, 0.5])
    # The NumPy form (ONNX Runtime's) averages the same way.
    as_numpy = flip_tta_numpy(
        lambda b: model(torch.from_numpy(b)).softmax(1).numpy(), image.numpy(), flip_tta=True
    )
    assert as_numpy[0] == pytest.approx([0.5, 0.5])


def _sklearn_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    """The definitions metrics.py had before it streamed: sklearn on the whole N x C matrix."""
    from sklearn import metrics as skm

    predicted = (probs[:, 1] >= threshold).astype(int) if probs.shape[1] == 2 else probs.argmax(1)
    classes = np.arange(probs.shape[1])
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        labels, predicted, labels=classes, average="macro", zero_division=0
    )
    result = {
        "accuracy": skm.accuracy_score(labels, predicted),
        "balanced_accuracy": skm.recall_score(
            labels, predicted, labels=np.unique(labels), average="macro", zero_division=0
        ),
        "macro_precision": precision,
        "macro_recall": recall,
        "macro_f1": f1,
    }
    if probs.shape[1] > 5:
        result["top5_accuracy"] = skm.top_k_accuracy_score(labels, probs, k=5, labels=classes)
    if probs.shape[1] == 2:
        result["roc_auc"] = skm.roc_auc_score(labels, probs[:, 1])
        result["pr_auc"] = skm.average_precision_score(labels, probs[:, 1])
    return result


@pytest.mark.parametrize("classes", [2, 7, 30])
def test_streamed_counts_merged_across_workers_equal_sklearn_on_the_whole_matrix(classes):
    """Batches of uneven size, split over 3 'workers' whose counts are merged (once through the
    all-reduce vector): the same metrics as sklearn on all samples at once, ties included
    (probabilities rounded to 0.05 tie often, which is where top-5 ranking is subtle)."""
    from attnpipe.metrics import MetricCounts

    rng = np.random.default_rng(classes)
    n = 500
    labels = rng.integers(0, classes, n)
    labels[:classes] = np.arange(classes)  # every class present
    probs = np.round(rng.dirichlet(np.ones(classes) * 0.5, n) / 0.05) * 0.05 + 1e-3
    probs /= probs.sum(1, keepdims=True)
    log_probs = np.log(probs).astype(np.float32)
    workers = [MetricCounts(classes, threshold=0.4) for _ in range(3)]
    cuts = [0, 17, 18, 140, 333, 334, n]
    for i, (start, stop) in enumerate(itertools.pairwise(cuts)):
        part = slice(start, stop)
        workers[i % 3].add(labels[part], probs[part], log_probs[part])
    merged = workers[0].merge(workers[1])
    reduced = MetricCounts(classes, threshold=0.4)
    reduced.from_vector(merged.to_vector() + workers[2].to_vector())
    reduced.positive, reduced.positive_labels = merged.positive, merged.positive_labels
    reduced.positive += workers[2].positive
    reduced.positive_labels += workers[2].positive_labels
    got = reduced.metrics()
    expected = _sklearn_metrics(labels, probs, 0.4)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["ece"] == pytest.approx(expected_calibration_error(labels, probs), abs=1e-12)
    picked = log_probs[np.arange(n), labels].astype(np.float64)
    assert reduced.loss() == pytest.approx(-picked.mean(), rel=1e-12)
    assert reduced.samples == n
    assert reduced.matrix.sum(axis=1).tolist() == np.bincount(labels, minlength=classes).tolist()
