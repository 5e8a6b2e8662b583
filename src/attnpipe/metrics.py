"""Classification metrics, defined once for validation (training) and evaluation (reports).

Inputs are whole-split arrays (every sample once, gathered from all ranks): metrics are never
averaged per rank or per batch.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Headline metrics for `labels` (N,) against class probabilities `probs` (N, C).

    Binary tasks (C == 2) predict class 1 when its probability >= `threshold` and add ROC-AUC,
    PR-AUC (average precision), sensitivity and specificity at that threshold; tasks with more
    than 5 classes add top-5 accuracy (with 5 or fewer it is always 1). Macro averages weigh
    every class equally, including classes absent from `labels` (their recall counts as 0).
    """
    labels = np.asarray(labels)
    num_classes = probs.shape[1]
    predictions = predict_classes(probs, threshold)
    all_classes = np.arange(num_classes)
    result = {
        "accuracy": float(skm.accuracy_score(labels, predictions)),
        "balanced_accuracy": _balanced_accuracy(labels, predictions),
    }
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        labels, predictions, labels=all_classes, average="macro", zero_division=0
    )
    result["macro_precision"] = float(precision)
    result["macro_recall"] = float(recall)
    result["macro_f1"] = float(f1)
    result["ece"] = expected_calibration_error(labels, probs)
    if num_classes > 5:
        result["top5_accuracy"] = float(
            skm.top_k_accuracy_score(labels, probs, k=5, labels=all_classes)
        )
    if num_classes == 2:
        positive = probs[:, 1]
        both_present = len(np.unique(labels)) == 2
        result["roc_auc"] = (
            float(skm.roc_auc_score(labels, positive)) if both_present else float("nan")
        )
        result["pr_auc"] = (
            float(skm.average_precision_score(labels, positive)) if both_present else float("nan")
        )
        tn, fp, fn, tp = skm.confusion_matrix(labels, predictions, labels=[0, 1]).ravel()
        result["sensitivity"] = float(tp / (tp + fn)) if tp + fn else float("nan")
        result["specificity"] = float(tn / (tn + fp)) if tn + fp else float("nan")
    return result


def predict_classes(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    if probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(np.int64)
    return probs.argmax(axis=1)


def _balanced_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Mean recall over the classes present in `labels` (sklearn's definition)."""
    recall = skm.recall_score(
        labels, predictions, labels=np.unique(labels), average="macro", zero_division=0
    )
    return float(recall)


def per_class_report(
    labels: np.ndarray, probs: np.ndarray, class_names: list[str], threshold: float = 0.5
) -> list[dict]:
    predictions = predict_classes(probs, threshold)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predictions, labels=np.arange(len(class_names)), zero_division=0
    )
    return [
        {
            "class": name,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    ]


def confusion(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Rows are true classes, columns predicted."""
    classes = np.arange(probs.shape[1])
    return skm.confusion_matrix(labels, predict_classes(probs, threshold), labels=classes)


def calibration_bins(
    labels: np.ndarray, probs: np.ndarray, bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-1 confidence in `bins` equal-width bins (lo, hi]: (mean confidence, accuracy, count)
    per bin; empty bins hold NaN and 0. The reliability diagram and the ECE read the same bins.
    """
    labels = np.asarray(labels)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / counts
        accuracy = np.bincount(which, weights=correct, minlength=bins) / counts
    return mean_confidence, accuracy, counts


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-1 confidence with equal-width bins (Guo et al. 2017): the sample-weighted
    mean of |accuracy - confidence| over the bins."""
    if len(probs) == 0:
        return float("nan")
    mean_confidence, accuracy, counts = calibration_bins(labels, probs, bins)
    filled = counts > 0
    gaps = np.abs(accuracy[filled] - mean_confidence[filled])
    return float((counts[filled] / counts.sum() * gaps).sum())
