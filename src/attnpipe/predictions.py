"""One way to turn a model and batches into class probabilities: validation, evaluate, predict.

The network's output is kept as log-probabilities (log-softmax, float32; under mixed precision
the head runs in float32): the probabilities are their exponential (in float64, the metrics'
input), and the validation loss is their negative mean at the true class, which is exactly the
cross-entropy of the logits. Batches go
straight into streamed counts (`attnpipe.metrics.MetricCounts`); no split-sized matrix is
kept. Flip test-time augmentation averages the *probabilities* of an image and its mirror
(a log-sum-exp in this form). What class those probabilities decide is
`attnpipe.metrics.predict_classes` (a threshold on binary tasks, argmax otherwise), the one
decision rule of every consumer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from attnpipe.metrics import MetricCounts

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]  # images (N, 3, S, S), labels (N,), ids


def class_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, C) float32 logits. Under mixed precision the backbone runs in bf16/fp16 but the
    head in float32: bf16 logits keep 8 bits of mantissa (steps of 0.5 around 100), coarse
    enough to tie close classes and move the metrics, and casting them afterwards restores
    nothing. Models without the `forward_features` / `forward_head` split run whole."""
    device = images.device.type
    split = hasattr(model, "forward_features") and hasattr(model, "forward_head")
    if not (split and torch.is_autocast_enabled(device)):
        return model(images).float()
    features = model.forward_features(images)
    with torch.autocast(device, enabled=False):
        return model.forward_head(features.float()).float()


def class_log_probabilities(
    model: nn.Module, images: torch.Tensor, flip_tta: bool = False
) -> torch.Tensor:
    """(N, C) float32 log-probabilities; with `flip_tta`, of the mean of image and mirror."""
    log_probs = class_logits(model, images).log_softmax(dim=1)
    if flip_tta:
        mirrored = class_logits(model, images.flip(-1)).log_softmax(dim=1)
        log_probs = torch.logaddexp(log_probs, mirrored) - math.log(2.0)
    return log_probs


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
    the exponential of the float32 log-probabilities)."""
    log_probs_np = log_probs.numpy()
    probs = np.exp(log_probs_np.astype(np.float64))
    counts.add(labels.cpu().numpy(), probs, log_probs_np)
    return probs
