"""The step loop: one epoch of training steps, with gradient accumulation and the stop vote."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from attnpipe.train.build import Run
from attnpipe.train.stop_vote import StopVote


def epoch_batches(run: Run, epoch: int, skip: int = 0) -> Iterator[Any]:
    """The training batches of `epoch` after its first `skip` (trained before a resume from a
    mid-epoch checkpoint); with loader workers, they start reading now."""
    run.train_stream.set_epoch(epoch, skip)
    return iter(run.train_loader)


@dataclass
class EpochProgress:
    """This rank's part of the epoch so far: what a mid-epoch checkpoint keeps of it, and where
    a run resumed from one starts the epoch again (`step` 0: at its beginning)."""

    step: int = 0  # batches trained this epoch
    loss_sum: torch.Tensor | None = None  # their summed training loss
    samples: int = 0
    seconds: float = 0.0  # trained in earlier attempts
    started: float = field(default_factory=time.perf_counter)  # this attempt's start

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self.started


# Called after each training step: (the epoch, the step, the progress after it).
AfterStep = Callable[[int, int, EpochProgress], None]


@dataclass(frozen=True)
class EpochOutcome:
    loss: float  # mean training loss over all ranks
    samples: int  # this rank's training samples
    seconds: float
    stopped: bool  # a stop was requested (all ranks agreed) before the epoch ended


def train_one_epoch(
    run: Run,
    epoch: int,
    batches: Iterator[Any],
    vote: StopVote,
    resumed: EpochProgress | None = None,
    after_step: AfterStep | None = None,
) -> EpochOutcome:
    """One epoch over `batches` (from `epoch_batches`), from `resumed`'s step when given (the
    batches then start there), with `after_step` (mid-epoch checkpoints) after each step."""
    run.tracer.event("epoch", epoch + 1)
    run.ddp_model.train()
    progress = EpochProgress() if resumed is None else resumed
    progress.started = time.perf_counter()
    if progress.loss_sum is None:
        progress.loss_sum = torch.zeros((), device=run.device)
    ids: list[str] = []
    run.optimizer.zero_grad(set_to_none=True)
    for step, (images, labels, batch_ids) in enumerate(batches, start=progress.step):
        # With MixUp/CutMix on, `targets` are soft (N, C) and the logged train_loss is the
        # loss against the mixed targets: comparable between epochs and between runs with the
        # same mixing, higher than a clean-label loss and so not comparable with val_loss.
        images, targets = run.batch_augment(images, labels)
        loss = train_step(run, step, images, targets)
        progress.loss_sum += loss * labels.shape[0]
        progress.samples += labels.shape[0]
        progress.step = step + 1
        if run.tracer.enabled:
            ids.extend(batch_ids)
        if vote.due(step) and vote.check():
            return EpochOutcome(math.nan, progress.samples, progress.elapsed(), stopped=True)
        if after_step is not None:
            after_step(epoch, step, progress)
    vote.close_epoch()  # read after the checkpoint: however short the epoch, it asks
    run.tracer.sample_ids(epoch + 1, ids)
    mean_loss = _mean_across_ranks(progress.loss_sum, progress.samples, run.world, run.device)
    return EpochOutcome(mean_loss, progress.samples, progress.elapsed(), stopped=False)


def train_step(run: Run, step: int, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Forward and backward of one batch (`labels`: integer labels, or soft targets (N, C)
    from MixUp/CutMix); an optimizer step at the end of each accumulation group. Each batch's
    loss is divided by its group's real size (the last group of an epoch may be shorter), so
    every optimizer step averages over the batches it takes."""
    accumulate = run.train.accumulate_steps
    group_start = step - step % accumulate
    group_size = min(accumulate, run.steps - group_start)
    last_in_group = step + 1 == group_start + group_size
    sync = nullcontext() if last_in_group or run.world == 1 else run.ddp_model.no_sync()
    autocast = torch.autocast(
        run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None
    )
    with sync, autocast:
        loss = run.criterion(run.ddp_model(images), labels)
        run.scaler.scale(loss / group_size).backward()
    if last_in_group:
        optimizer_step(run)
    return loss.detach()


def optimizer_step(run: Run) -> None:
    if run.train.grad_clip_norm:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), run.train.grad_clip_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.schedule.step()
    if run.ema is not None:
        run.ema.update_parameters(run.model)


def _mean_across_ranks(total: torch.Tensor, count: int, world: int, device: torch.device) -> float:
    packed = torch.stack([total.float(), torch.tensor(float(count), device=device)])
    if world > 1:
        dist.all_reduce(packed)
    return (packed[0] / packed[1].clamp(min=1)).item()
