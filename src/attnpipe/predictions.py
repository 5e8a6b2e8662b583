"""One way to turn a model and batches into class probabilities: validation, evaluate, predict.

The network's output is kept as log-probabilities (log-softmax, float32): the probabilities
are their exponential, and the validation loss is their negative mean at the true class, which
is exactly the cross-entropy of the logits. Flip test-time augmentation averages the
*probabilities* of an image and its mirror (a log-sum-exp in this form). What class those
probabilities decide is `attnpipe.metrics.predict_classes` (a threshold on binary tasks,
argmax otherwise), the one decision rule of every consumer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from attnpipe.metrics import MetricCounts

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]  # images (N, 3, S, S), labels (N,), ids


def class_log_probabilities(
    model: nn.Module, images: torch.Tensor, flip_tta: bool = False
) -> torch.Tensor:
    """(N, C) float32 log-probabilities; with `flip_tta`, of the mean of image and mirror."""
    log_probs = model(images).float().log_softmax(dim=1)
    if flip_tta:
        mirrored = model(images.flip(-1)).float().log_softmax(dim=1)
        log_probs = torch.logaddexp(log_probs, mirrored) - math.log(2.0)
    return log_probs


@dataclass(frozen=True)
class Predictions:
    """Every sample of a split once: ids, true labels and the model's log-probabilities."""

    ids: list[str]
    labels: np.ndarray  # (N,) int64
    log_probs: np.ndarray  # (N, C) float32

    @property
    def probs(self) -> np.ndarray:
        """(N, C) float64 probabilities (the metrics' input)."""
        return np.exp(self.log_probs.astype(np.float64))

    def loss(self) -> float:
        """Mean cross-entropy of the true classes (NaN for an empty split)."""
        if not len(self.labels):
            return math.nan
        picked = self.log_probs[np.arange(len(self.labels)), self.labels]
        return float(-picked.astype(np.float64).mean())

    @classmethod
    def concatenate(cls, parts: Iterable[Predictions]) -> Predictions:
        parts = [p for p in parts if len(p.labels)]
        if not parts:
            return cls([], np.zeros(0, np.int64), np.zeros((0, 0), np.float32))
        return cls(
            ids=[i for p in parts for i in p.ids],
            labels=np.concatenate([p.labels for p in parts]),
            log_probs=np.concatenate([p.log_probs for p in parts]),
        )


def iter_predictions(
    model: nn.Module,
    batches: Iterable[Batch],
    flip_tta: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Each batch as it came, with its log-probabilities on the CPU (model in eval mode).

    The model's train/eval mode is restored when the iteration ends.
    """
    was_training = model.training
    model.eval()
    try:
        for images, labels, ids in batches:
            autocast = (
                torch.autocast(images.device.type, dtype=amp_dtype)
                if amp_dtype is not None
                else nullcontext()
            )
            with torch.inference_mode(), autocast:
                log_probs = class_log_probabilities(model, images, flip_tta)
            yield (images, labels, ids), log_probs.float().cpu()
    finally:
        model.train(was_training)


def predict_batches(
    model: nn.Module,
    batches: Iterable[Batch],
    flip_tta: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> Predictions:
    """Log-probabilities of every sample of `batches`, in order."""
    ids: list[str] = []
    labels: list[np.ndarray] = []
    log_probs: list[np.ndarray] = []
    for (_, batch_labels, batch_ids), batch_log_probs in iter_predictions(
        model, batches, flip_tta, amp_dtype
    ):
        ids.extend(batch_ids)
        labels.append(batch_labels.cpu().numpy())
        log_probs.append(batch_log_probs.numpy())
    if not ids:
        return Predictions([], np.zeros(0, np.int64), np.zeros((0, 0), np.float32))
    return Predictions(ids, np.concatenate(labels), np.concatenate(log_probs))


def count_predictions(
    model: nn.Module,
    batches: Iterable[Batch],
    counts: MetricCounts,
    flip_tta: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> MetricCounts:
    """Adds every batch's predictions to `counts` (metrics streamed, no N x C matrix kept)."""
    for (_, labels, _), log_probs in iter_predictions(model, batches, flip_tta, amp_dtype):
        add_batch(counts, labels, log_probs)
    return counts


def add_batch(counts: MetricCounts, labels: torch.Tensor, log_probs: torch.Tensor) -> np.ndarray:
    """One batch into `counts`; returns its (B, C) float64 probabilities (the metrics' input:
    the exponential of the float32 log-probabilities, as `Predictions.probs`)."""
    log_probs_np = log_probs.numpy()
    probs = np.exp(log_probs_np.astype(np.float64))
    counts.add(labels.cpu().numpy(), probs, log_probs_np)
    return probs
