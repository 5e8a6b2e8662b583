"""Classification metrics, defined once for validation (training) and evaluation (reports).

Metrics are streamed: `MetricCounts` takes batches of probabilities and keeps only counts (the
confusion matrix, top-5 hits, calibration bins, the loss sum) and, for binary tasks, the
positive class's probability per sample (ROC and PR curves need every score). Counts of
several ranks or workers add up (`merge`, `to_vector`/`from_vector` for a collective), so a
split's metrics are computed once from the whole split's counts: never averaged per rank or
per batch, and never from an N x C probability matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

CALIBRATION_BINS = 15
TOP_K = 5


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class MetricCounts:
    """What a split's metrics need, accumulated batch by batch (see the module docstring).

    `add(labels, probs)` with (B,) labels and (B, C) probabilities; `log_probs` (the model's
    float32 output) adds the cross-entropy of the true classes to `loss()`.
    """

    def __init__(
        self, num_classes: int, threshold: float = 0.5, bins: int = CALIBRATION_BINS
    ) -> None:
        self.num_classes, self.threshold, self.bins = num_classes, threshold, bins
        self.matrix = np.zeros((num_classes, num_classes), np.int64)  # true x predicted
        self.top_k_hits = 0
        self.bin_count = np.zeros(bins, np.int64)
        self.bin_confidence = np.zeros(bins, np.float64)
        self.bin_correct = np.zeros(bins, np.float64)
        self.loss_sum = 0.0
        self.positive: list[np.ndarray] = []  # binary: p(class 1) per sample, float64
        self.positive_labels: list[np.ndarray] = []

    @property
    def samples(self) -> int:
        return int(self.matrix.sum())

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    def add(
        self, labels: np.ndarray, probs: np.ndarray, log_probs: np.ndarray | None = None
    ) -> None:
        labels = np.asarray(labels, np.int64)
        if not len(labels):
            return
        predicted = predict_classes(probs, self.threshold)
        np.add.at(self.matrix, (labels, predicted), 1)
        if self.num_classes > TOP_K:
            self.top_k_hits += int(top_k_hits(labels, probs, TOP_K).sum())
        confidence = probs.max(axis=1)
        correct = (probs.argmax(axis=1) == labels).astype(np.float64)
        which = _calibration_bin(confidence, self.bins)
        self.bin_count += np.bincount(which, minlength=self.bins)
        self.bin_confidence += np.bincount(which, weights=confidence, minlength=self.bins)
        self.bin_correct += np.bincount(which, weights=correct, minlength=self.bins)
        if log_probs is not None:
            picked = log_probs[np.arange(len(labels)), labels].astype(np.float64)
            self.loss_sum -= float(picked.sum())
        if self.binary:
            self.positive.append(np.asarray(probs[:, 1], np.float64))
            self.positive_labels.append(labels)

    def merge(self, other: MetricCounts) -> MetricCounts:
        """Adds `other`'s counts (another rank's or worker's share of the split) to these."""
        self.from_vector(self.to_vector() + other.to_vector())
        self.positive += other.positive
        self.positive_labels += other.positive_labels
        return self

    def to_vector(self) -> np.ndarray:
        """Every count and sum as one float64 vector (exact for counts below 2**53), to add
        across ranks with one all-reduce; the binary scores travel separately."""
        return np.concatenate(
            [
                self.matrix.ravel().astype(np.float64),
                [self.top_k_hits, self.loss_sum],
                self.bin_count.astype(np.float64),
                self.bin_confidence,
                self.bin_correct,
            ]
        )

    def from_vector(self, vector: np.ndarray) -> None:
        c, b = self.num_classes, self.bins
        self.matrix = np.rint(vector[: c * c]).astype(np.int64).reshape(c, c)
        self.top_k_hits, self.loss_sum = int(np.rint(vector[c * c])), float(vector[c * c + 1])
        rest = vector[c * c + 2 :]
        self.bin_count = np.rint(rest[:b]).astype(np.int64)
        self.bin_confidence, self.bin_correct = rest[b : 2 * b].copy(), rest[2 * b :].copy()

    def binary_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels, p(class 1)) of every sample added (binary tasks; empty otherwise)."""
        if not self.positive:
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        return np.concatenate(self.positive_labels), np.concatenate(self.positive)

    def loss(self) -> float:
        """Mean cross-entropy of the true classes (NaN for an empty split)."""
        return self.loss_sum / self.samples if self.samples else math.nan

    def calibration_bins(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean confidence, accuracy, count) per bin; empty bins hold NaN and 0."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return (
                self.bin_confidence / self.bin_count,
                self.bin_correct / self.bin_count,
                self.bin_count.copy(),
            )

    def expected_calibration_error(self) -> float:
        if not self.samples:
            return float("nan")
        mean_confidence, accuracy, counts = self.calibration_bins()
        filled = counts > 0
        gaps = np.abs(accuracy[filled] - mean_confidence[filled])
        return float((counts[filled] / counts.sum() * gaps).sum())

    def metrics(self) -> dict[str, float]:
        """The headline metrics (see `classification_metrics`) of everything added."""
        matrix, n = self.matrix, self.samples
        tp, support, predicted = np.diag(matrix), matrix.sum(axis=1), matrix.sum(axis=0)
        precision, recall, f1 = _per_class_rates(tp, support, predicted)
        present = support > 0
        result = {
            "accuracy": float(tp.sum() / n) if n else float("nan"),
            "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
            "macro_precision": float(precision.mean()),
            "macro_recall": float(recall.mean()),
            "macro_f1": float(f1.mean()),
            "ece": self.expected_calibration_error(),
        }
        if self.num_classes > TOP_K:
            result["top5_accuracy"] = float(self.top_k_hits / n) if n else float("nan")
        if self.binary:
            result.update(self._binary_metrics())
        return result

    def _binary_metrics(self) -> dict[str, float]:
        # Imported here: scikit-learn costs every training worker a second at start-up, and
        # only binary tasks need it.
        from sklearn import metrics as skm

        labels, positive = self.binary_scores()
        both_present = len(np.unique(labels)) == 2
        (tn, fp), (fn, tp) = self.matrix
        return {
            "roc_auc": float(skm.roc_auc_score(labels, positive)) if both_present else math.nan,
            "pr_auc": (
                float(skm.average_precision_score(labels, positive)) if both_present else math.nan
            ),
            "sensitivity": float(tp / (tp + fn)) if tp + fn else math.nan,
            "specificity": float(tn / (tn + fp)) if tn + fp else math.nan,
        }

    def per_class(self, class_names: Sequence[str]) -> list[dict]:
        """Precision, recall, F1 and support of every class (0 where undefined)."""
        tp = np.diag(self.matrix)
        support, predicted = self.matrix.sum(axis=1), self.matrix.sum(axis=0)
        precision, recall, f1 = _per_class_rates(tp, support, predicted)
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


def _per_class_rates(
    tp: np.ndarray, support: np.ndarray, predicted: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 per class, 0 where a denominator is 0 (sklearn's
    zero_division=0; its F1 is 2 tp / (support + predicted))."""
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
    return precision, recall, f1


def top_k_hits(labels: np.ndarray, probs: np.ndarray, k: int) -> np.ndarray:
    """Whether each true class is among the `k` highest probabilities, ties ranked as sklearn's
    `top_k_accuracy_score` ranks them (the higher class index first)."""
    true_score = probs[np.arange(len(labels)), labels][:, None]
    higher = (probs > true_score).sum(axis=1)
    tied_after = ((probs == true_score) & (np.arange(probs.shape[1]) > labels[:, None])).sum(axis=1)
    return higher + tied_after < k


def _calibration_bin(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins (lo, hi] of the top-1 confidence."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)


def counts_of(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> MetricCounts:
    """The counts of a whole split given at once."""
    counts = MetricCounts(probs.shape[1], threshold)
    counts.add(labels, probs)
    return counts


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Headline metrics for `labels` (N,) against class probabilities `probs` (N, C).

    Binary tasks (C == 2) predict class 1 when its probability >= `threshold` and add ROC-AUC,
    PR-AUC (average precision), sensitivity and specificity at that threshold; tasks with more
    than 5 classes add top-5 accuracy (with 5 or fewer it is always 1). Macro averages weigh
    every class equally, including classes absent from `labels` (their recall counts as 0);
    balanced accuracy is the mean recall of the classes present.
    """
    return counts_of(labels, probs, threshold).metrics()


def predict_classes(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    if probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(np.int64)
    return probs.argmax(axis=1)


def per_class_report(
    labels: np.ndarray, probs: np.ndarray, class_names: list[str], threshold: float = 0.5
) -> list[dict]:
    return counts_of(labels, probs, threshold).per_class(class_names)


def confusion(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Rows are true classes, columns predicted."""
    return counts_of(labels, probs, threshold).matrix


def calibration_bins(
    labels: np.ndarray, probs: np.ndarray, bins: int = CALIBRATION_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-1 confidence in `bins` equal-width bins (lo, hi]: (mean confidence, accuracy, count)
    per bin; empty bins hold NaN and 0. The reliability diagram and the ECE read the same bins.
    """
    counts = MetricCounts(probs.shape[1], bins=bins)
    counts.add(labels, probs)
    return counts.calibration_bins()


def expected_calibration_error(
    labels: np.ndarray, probs: np.ndarray, bins: int = CALIBRATION_BINS
) -> float:
    """ECE of the top-1 confidence with equal-width bins (Guo et al. 2017): the sample-weighted
    mean of |accuracy - confidence| over the bins."""
    counts = MetricCounts(probs.shape[1], bins=bins)
    counts.add(labels, probs)
    return counts.expected_calibration_error()
