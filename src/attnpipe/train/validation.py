"""Validation: every validation sample once, counts added over ranks; the epoch's row."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from attnpipe.data.loaders import make_loader
from attnpipe.errors import AttnpipeError
from attnpipe.metrics import MetricCounts
from attnpipe.overlays import attention_examples
from attnpipe.predictions import count_predictions
from attnpipe.tracking import WandbRun
from attnpipe.train.build import Run, synced_batchnorm
from attnpipe.train.checkpoint import TrainingState, load_best_weights
from attnpipe.train.steps import EpochOutcome

OVERLAY_IMAGES = 8


class EmptySplitError(AttnpipeError, ValueError):
    """A split the loop needs has no samples."""


def validate(run: Run) -> dict[str, float]:
    """Loss and metrics over every validation sample: each rank counts its share, the counts
    are added across ranks (one all-reduce), and the metrics come from the totals.

    Runs on the unwrapped model: DDP's forward is a collective, and ranks may hold different
    numbers of evaluation batches.
    """
    model = run.eval_model
    if not synced_batchnorm(run.train, run.world):
        _sync_buffers(model, run.world)
    counts = MetricCounts(len(run.classes), run.recipe.evaluate.threshold)
    count_predictions(model, run.val_loader, counts, amp_dtype=run.amp_dtype)
    counts = reduce_counts(counts, run.device)
    if not counts.samples:
        raise EmptySplitError("the validation split is empty: give prepare.splits.val a share")
    return {"loss": counts.loss(), **counts.metrics()}


def reduce_counts(local: MetricCounts, device: torch.device) -> MetricCounts:
    """Every rank's counts added up, the same on every rank: one all-reduce of a vector of
    C x C + 47 numbers; binary tasks also gather each sample's positive score (ROC/PR-AUC
    need them), N floats, instead of every rank's N x C predictions as before."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    vector = torch.from_numpy(local.to_vector()).to(device)
    dist.all_reduce(vector)
    total = MetricCounts(local.num_classes, local.threshold, local.bins)
    total.from_vector(vector.cpu().numpy())
    if local.binary:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local.binary_scores())
        total.positive_labels = [labels for labels, _ in parts]
        total.positive = [scores for _, scores in parts]
    return total


def epoch_row(run: Run, epoch: int, outcome: EpochOutcome, val: dict[str, float]) -> dict[str, Any]:
    """The history row of a finished epoch (train_history.csv, W&B, Ray's reported metrics)."""
    return {
        "epoch": epoch,
        "train_loss": outcome.loss,
        "lr": run.schedule.get_last_lr()[0],
        **{f"val_{k}": v for k, v in val.items()},
        "train_images_per_s": outcome.samples * run.world / max(outcome.seconds, 1e-9),
        "epoch_seconds": outcome.seconds,
        "world_size": run.world,  # elastic runs change it between epochs
    }


def overlays_if_last_epoch(
    run: Run, state: TrainingState, tracker: WandbRun
) -> list[tuple[np.ndarray, str]]:
    """The best model's attention on a few validation images, for the last epoch's W&B row
    (every row is committed when logged, so they go in it rather than after it)."""
    if tracker.run is None or not state.finished(run.train):
        return []
    best = copy.deepcopy(run.eval_model)  # the checkpoint keeps the training weights
    if load_best_weights(state) is not None:
        best.load_state_dict(state.best_weights)
    images, labels, ids = next(iter(make_loader(run.val_stream, OVERLAY_IMAGES, workers=0)))
    mean, std = run.recipe.augment.mean, run.recipe.augment.std
    return attention_examples(best, images, labels.tolist(), run.classes, mean, std, ids=ids)


def _sync_buffers(model: nn.Module, world: int) -> None:
    """Give every rank rank 0's BatchNorm statistics before validating.

    DDP broadcasts buffers from rank 0 at the start of each training forward, but each rank's
    last forward still updated its own running statistics: without this, ranks would validate
    slightly different models, and not the one rank 0 checkpoints.
    """
    if world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
