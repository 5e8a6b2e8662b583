"""The per-worker training loop: single-process PyTorch with the distributed parts named.

Ray starts one copy per worker (`train_loop_per_worker`); `torchrun` can run the same
`run_training` (`attnpipe.train.torchrun`). Phases:

    run = build(config, session)        model, DDP, optimizer, schedule, data streams
    state = resume(run)                  the latest checkpoint of this run, if any
    for each epoch:
        train_one_epoch(run, epoch)      this rank's share of the shards; equal steps per rank
        validate(run)                    every validation sample once, counts added over ranks
                                         (meanwhile the loader workers read the next epoch)
        save_checkpoint(run, state)      rank 0 writes, every rank reports (a barrier)
        tracker.log_epoch(row)           rank 0's W&B row: only after its checkpoint
    finish(run, state)                   W&B summary, model artifact, offline run kept

A restarted worker group, or a re-launched run, continues from the latest checkpoint. A row
never outruns its checkpoint, and a resumed attempt logs exactly the rows W&B does not hold
yet (`WandbRun.logged_steps`): a kill at any point leaves every epoch once in W&B and in the
history (tests/train/test_fault_points.py kills at each point, via `attnpipe.train.faults`).
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from attnpipe.config import Recipe, TrainConfig
from attnpipe.data.batch_augment import BatchAugment
from attnpipe.data.loaders import (
    ShardEntry,
    ShardLoader,
    ShardStream,
    build_transform,
    make_loader,
    split_info,
    train_batches,
)
from attnpipe.devices import describe_amp, memory_format_for, resolve_amp
from attnpipe.errors import AttnpipeError
from attnpipe.metrics import MetricCounts
from attnpipe.models import create_model
from attnpipe.overlays import attention_examples
from attnpipe.predictions import count_predictions
from attnpipe.tracking import WandbRun, artifact_aliases, export_wandb_run
from attnpipe.train.checkpoint import (
    TrainingState,
    load_best_weights,
    prune_best_weights,
    read_checkpoint,
    restore_rng,
    restore_scaler,
    rng_state,
    write_best_model,
    write_best_weights,
    write_checkpoint,
)
from attnpipe.train.ema import DeviceEma
from attnpipe.train.faults import fault_point
from attnpipe.train.loop_config import LoopConfig
from attnpipe.train.losses import build_loss
from attnpipe.train.repeatability import apply_determinism, loader_generator
from attnpipe.train.reporting import Tracer, epoch_line, say
from attnpipe.train.schedules import LrSchedule, scaled_lr
from attnpipe.train.session import RaySession, WorkerSession
from attnpipe.train.stop_vote import StopVote

OVERLAY_IMAGES = 8


class EmptySplitError(AttnpipeError, ValueError):
    """A split the loop needs has no samples."""


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point: one call per worker."""
    loop: LoopConfig = config["loop"]
    # First thing in the worker: cuBLAS reads its workspace setting when CUDA starts.
    apply_determinism(loop.recipe.train.deterministic)
    run_training(loop, RaySession(stop_name=loop.stop_name, use_gpu=loop.use_gpu))


def run_training(config: LoopConfig, session: WorkerSession) -> None:
    """The loop itself, for any launcher that provides a `WorkerSession`."""
    run = build(config, session)
    state = resume(run)
    tracker = start_tracking(run)
    for row in state.history:  # rows an earlier attempt checkpointed but W&B never got
        tracker.log_epoch(row, step=row["epoch"])
    run.tracer.event("start", state.epoch)
    clock = (time.perf_counter(), state.epoch)
    vote = StopVote(session)
    batches = _epoch_batches(run, state.epoch)
    for epoch in range(state.epoch, run.train.epochs):
        outcome = train_one_epoch(run, epoch, batches, vote)
        if outcome.stopped:
            stop_on_request(run, state, tracker, epoch + 1)
            return
        if epoch + 1 < run.train.epochs:
            # The loader workers read the next epoch's first batches while validation runs.
            batches = _epoch_batches(run, epoch + 1)
        run.tracer.event("validate", epoch + 1)
        val = validate(run)
        end_epoch(run, state, tracker, epoch_row(run, epoch + 1, outcome, val), outcome, clock)
        if vote.settle():  # asked during the epoch's last steps: it is saved, stop now
            stop_on_request(run, state, tracker, epoch + 2)
            return
        if state.should_stop(run.train.early_stopping_patience):
            if run.rank == 0:
                say(
                    f"early stopping: {run.train.monitor} did not improve for "
                    f"{run.train.early_stopping_patience} epochs"
                )
            break
    finish(run, state, tracker)


def end_epoch(
    run: Run,
    state: TrainingState,
    tracker: WandbRun,
    row: dict[str, Any],
    outcome: EpochOutcome,
    clock: tuple[float, int],
) -> None:
    """Record the epoch, checkpoint it, then log its row: in that order, so that a kill
    between the two leaves a checkpoint whose row the next attempt logs, never a row whose
    epoch is trained again."""
    state.epoch = row["epoch"]
    state.samples_seen += outcome.samples * run.world
    improved = state.record(row, run.train.monitor)
    if improved and run.rank == 0:  # only rank 0 writes them
        state.best_weights = _cpu_copy(run.eval_model.state_dict())
    fault_point("validated", state.epoch, run.rank)
    run.tracer.event("checkpoint", state.epoch)
    save_checkpoint(run, state, row, improved)
    fault_point("checkpointed", state.epoch, run.rank)
    images = overlays_if_last_epoch(run, state, tracker)
    tracker.log_epoch(row, step=state.epoch, images={"val/attention_overlays": images})
    if run.rank == 0:
        started, first_epoch = clock
        per_epoch = (time.perf_counter() - started) / (state.epoch - first_epoch)
        say(epoch_line(row, state, run.train, per_epoch * (run.train.epochs - state.epoch)))
    fault_point("logged", state.epoch, run.rank)


def _epoch_batches(run: Run, epoch: int) -> Iterator[Any]:
    """The training batches of `epoch`; with loader workers, they start reading now."""
    run.train_stream.set_epoch(epoch)
    return iter(run.train_loader)


# --------------------------------------------------------------------------- build
@dataclass
class Run:
    """What one rank trains with, built once per attempt."""

    config: LoopConfig
    session: WorkerSession
    model: nn.Module  # the plain network: checkpoints, validation, EMA source
    ddp_model: nn.Module  # what training steps call: DDP-wrapped and/or compiled
    ema: DeviceEma | None
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    batch_augment: BatchAugment  # erasing, MixUp, CutMix on the device; off: the identity
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    train_stream: ShardStream
    val_stream: ShardStream
    train_loader: ShardLoader  # batches already on the device, normalised
    val_loader: ShardLoader
    steps: int  # batches per epoch on every rank
    samples_per_epoch: int  # training samples of one epoch, all ranks (this world size)
    classes: list[str]
    tracer: Tracer

    @property
    def recipe(self) -> Recipe:
        return self.config.recipe

    @property
    def train(self) -> TrainConfig:
        return self.config.recipe.train

    @property
    def rank(self) -> int:
        return self.session.rank

    @property
    def world(self) -> int:
        return self.session.world_size

    @property
    def device(self) -> torch.device:
        return self.session.device

    @property
    def eval_model(self) -> nn.Module:
        """What is validated, chosen as best and saved: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model


def build(config: LoopConfig, session: WorkerSession) -> Run:
    recipe, train = config.recipe, config.recipe.train
    apply_determinism(train.deterministic)  # before the model's first CUDA work
    torch.manual_seed(train.seed + session.rank)
    torch.set_num_threads(max(1, int(train.cpus_per_worker)))
    train_split, val_split = split_info(config.shards, "train"), split_info(config.shards, "val")
    speed = speed_settings(train, session.device)
    apply_speed_settings(speed)
    memory_format = speed.memory_format
    train_stream = _stream(recipe, train_split.shards, session, train=True)
    val_stream = _stream(recipe, val_split.shards, session, train=False)
    train_loader = _loader(train_stream, train.batch_size, train, session, memory_format, 0)
    val_loader = _loader(val_stream, recipe.evaluate.batch_size, train, session, memory_format, 1)
    steps = len(train_loader)  # the same on every rank
    model = build_model(recipe, len(train_split.classes), session, memory_format)
    # The EMA network keeps averaged BatchNorm statistics of its own, not its initial ones.
    ema = DeviceEma(model, train.ema_decay) if train.ema_decay else None
    # SyncBatchNorm already gives every rank the same statistics: DDP's broadcast of the
    # buffers before each forward would copy what is equal.
    ddp_model = session.prepare_model(
        model, broadcast_buffers=not _synced_batchnorm(train, session.world_size)
    )
    if train.compile:
        ddp_model = torch.compile(ddp_model)
    optimizer = build_optimizer(model, train)
    global_batch = session.world_size * train.batch_size * train.accumulate_steps
    schedule = LrSchedule(
        optimizer,
        train.schedule,
        scaled_lr(train.optimizer, global_batch),
        optimizer_steps_per_epoch(steps, train.accumulate_steps),
        train.epochs,
    )
    amp_dtype = resolve_amp(train.amp, session.device)
    if session.rank == 0:
        say(describe_amp(train.amp, amp_dtype, session.device))
    return Run(
        config=config,
        session=session,
        model=model,
        ddp_model=ddp_model,
        ema=ema,
        optimizer=optimizer,
        schedule=schedule,
        scaler=torch.amp.GradScaler(session.device.type, enabled=amp_dtype == torch.float16),
        criterion=build_loss(train.loss, train_split.class_counts).to(session.device),
        batch_augment=BatchAugment(recipe.augment, len(train_split.classes)),
        amp_dtype=amp_dtype,
        memory_format=memory_format,
        train_stream=train_stream,
        val_stream=val_stream,
        train_loader=train_loader,
        val_loader=val_loader,
        steps=steps,
        samples_per_epoch=epoch_samples(train_split.samples, session.world_size, train.batch_size),
        classes=train_split.classes,
        tracer=Tracer.from_environment(session, config.run_name),
    )


@dataclass(frozen=True)
class SpeedSettings:
    """The switches that make a GPU fast, decided per device (all off on CPUs)."""

    memory_format: torch.memory_format
    cudnn_benchmark: bool  # cuDNN times its algorithms once per input shape, then picks
    tf32: bool  # float32 matmuls and convolutions on tensor cores (10-bit mantissa inputs)


def speed_settings(train: TrainConfig, device: torch.device) -> SpeedSettings:
    on_gpu = device.type == "cuda"
    layout = memory_format_for(train.channels_last, device)
    # cuDNN's autotuner picks algorithms by timing them: not repeatable.
    return SpeedSettings(layout, cudnn_benchmark=on_gpu and not train.deterministic, tf32=on_gpu)


def apply_speed_settings(speed: SpeedSettings) -> None:
    if speed.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if speed.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def build_model(
    recipe: Recipe, num_classes: int, session: WorkerSession, memory_format: torch.memory_format
) -> nn.Module:
    model = create_model(
        recipe.model.name,
        num_classes=num_classes,
        pretrained=recipe.model.pretrained,
        **recipe.model.kwargs,
    )
    if recipe.train.sync_batchnorm and session.world_size > 1:
        # BatchNorm statistics over the global batch: small per-GPU batches stay stable.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device=session.device, memory_format=memory_format)


def _loader(
    stream: ShardStream,
    batch_size: int,
    train: TrainConfig,
    session: WorkerSession,
    memory_format: torch.memory_format,
    purpose: int,
) -> ShardLoader:
    """Built once per run: with loader workers, they persist across epochs (the stream's
    `set_epoch` reaches them through shared memory). Their random numbers (augmentation) come
    from a seed fixed by the recipe, the rank and `purpose` (0 training, 1 validation)."""
    return make_loader(
        stream,
        batch_size,
        train.loader_workers,
        session.device,
        memory_format,
        persistent=train.loader_workers > 0,
        generator=loader_generator(train.seed + purpose, session.rank),
    )


def _stream(
    recipe: Recipe, shards: list[ShardEntry], session: WorkerSession, train: bool
) -> ShardStream:
    # Seed and shuffle buffer shape training's plan and order; evaluation reads in order.
    return ShardStream(
        shards,
        rank=session.rank,
        world_size=session.world_size,
        transform=build_transform(recipe.augment, recipe.model.input_size, train=train),
        train=train,
        seed=recipe.train.seed,
        shuffle_buffer=recipe.train.shuffle_buffer,
    )


def epoch_samples(samples: int, world_size: int, batch_size: int) -> int:
    """Training samples one epoch takes at this world size, all ranks together."""
    size, batches = train_batches(samples, world_size, batch_size)
    return world_size * size * batches


def optimizer_steps_per_epoch(steps: int, accumulate: int) -> int:
    """Optimizer steps per epoch: one per group of `accumulate` batches, the last possibly
    shorter (it still steps, so the schedule counts it)."""
    return math.ceil(steps / accumulate)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    opt = config.optimizer
    # No weight decay on norms and biases: standard for BN-heavy networks.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": opt.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if opt.name == "adamw":
        return torch.optim.AdamW(groups, lr=opt.lr)
    return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov)


# --------------------------------------------------------------------------- resume
def resume(run: Run) -> TrainingState:
    """The state of the latest checkpoint (weights, optimizer, RNGs...), or a fresh one."""
    with run.session.latest_checkpoint() as folder:
        saved = read_checkpoint(folder) if folder else None
    if not saved:
        return TrainingState()
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    restore_scaler(run.scaler, saved["scaler"])
    if run.ema is not None and saved.get("ema"):
        run.ema.load_state_dict(saved["ema"])
    restore_rng(saved["rng"], run.rank, run.device)
    state = TrainingState.from_dict(saved["state"])
    # Where the samples trained on put it, in this world size's steps: a run resumed on more
    # or fewer ranks (elastic) keeps its place. Checkpoints without the count: by epochs.
    if state.samples_seen:
        run.schedule.set_position_by_samples(state.samples_seen, run.samples_per_epoch)
    else:
        run.schedule.set_position(state.epoch)
    state.resumed_from.append(state.epoch)
    if run.rank == 0:
        say(f"resuming from the checkpoint of epoch {state.epoch} (of {run.train.epochs})")
    return state


# --------------------------------------------------------------------------- train
@dataclass(frozen=True)
class EpochOutcome:
    loss: float  # mean training loss over all ranks
    samples: int  # this rank's training samples
    seconds: float
    stopped: bool  # a stop was requested (all ranks agreed) before the epoch ended


def train_one_epoch(run: Run, epoch: int, batches: Iterator[Any], vote: StopVote) -> EpochOutcome:
    """One epoch over `batches` (from `_epoch_batches`)."""
    run.tracer.event("epoch", epoch + 1)
    run.ddp_model.train()
    started = time.perf_counter()
    loss_sum = torch.zeros((), device=run.device)
    seen, ids = 0, []
    run.optimizer.zero_grad(set_to_none=True)
    for step, (images, labels, batch_ids) in enumerate(batches):
        # With MixUp/CutMix on, `targets` are soft (N, C) and the logged train_loss is the
        # loss against the mixed targets: comparable between epochs and between runs with the
        # same mixing, higher than a clean-label loss and so not comparable with val_loss.
        images, targets = run.batch_augment(images, labels)
        loss = train_step(run, step, images, targets)
        loss_sum += loss * labels.shape[0]
        seen += labels.shape[0]
        if run.tracer.enabled:
            ids.extend(batch_ids)
        if vote.due(step) and vote.check():
            return EpochOutcome(math.nan, seen, time.perf_counter() - started, stopped=True)
    run.tracer.sample_ids(epoch + 1, ids)
    mean_loss = _mean_across_ranks(loss_sum, seen, run.world, run.device)
    return EpochOutcome(mean_loss, seen, time.perf_counter() - started, stopped=False)


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


# --------------------------------------------------------------------------- validate
def validate(run: Run) -> dict[str, float]:
    """Loss and metrics over every validation sample: each rank counts its share, the counts
    are added across ranks (one all-reduce), and the metrics come from the totals.

    Runs on the unwrapped model: DDP's forward is a collective, and ranks may hold different
    numbers of evaluation batches.
    """
    model = run.eval_model
    if not _synced_batchnorm(run.train, run.world):
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


# --------------------------------------------------------------------------- checkpoint
def save_checkpoint(run: Run, state: TrainingState, row: dict[str, Any], improved: bool) -> None:
    """Rank 0 writes the checkpoint; every rank reports (Ray records it once all have).

    The best weights go to a file of their own, only when the epoch improved; the checkpoint
    names that file. Older files go once no checkpoint that may still be resumed names them.
    """
    rngs = _gather_rng_states(run.world, run.device)
    previous_best = state.best_location
    with tempfile.TemporaryDirectory() as folder:
        checkpoint_dir = None
        if run.rank == 0:
            if improved and state.best_weights is not None:
                state.best_location = write_best_weights(
                    run.config.best_weights_dir, state.epoch, state.best_weights
                )
            checkpoint_dir = Path(folder)
            write_checkpoint(
                checkpoint_dir,
                {
                    "model": run.model.state_dict(),
                    "optimizer": run.optimizer.state_dict(),
                    "schedule_step": run.schedule.step_count,
                    "scaler": run.scaler.state_dict(),
                    "ema": run.ema.state_dict() if run.ema is not None else None,
                    "rng": rngs,
                    "state": state.to_dict(),
                },
            )
        run.session.report(_scalars(row), checkpoint_dir)
    if run.rank == 0 and improved:
        prune_best_weights(run.config.best_weights_dir, {previous_best, state.best_location})


def _gather_rng_states(world: int, device: torch.device) -> list[dict[str, Any]]:
    state = rng_state(device)
    if world == 1:
        return [state]
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, state)
    return parts


# --------------------------------------------------------------------------- tracking
def start_tracking(run: Run) -> WandbRun:
    """World rank 0's W&B run (a no-op handle on the other ranks), with the shards as input."""
    if run.rank != 0:
        return WandbRun(None)
    config = run.config
    name = config.run_name
    if config.experiment_name:  # the name `dvc exp show` lists it under
        name = f"{config.experiment_name} ({config.run_name})"
    tracker = WandbRun.start(
        config.recipe.tracking.wandb,
        run_id=config.wandb_run_id,
        name=name,
        tags=config.wandb_tags,
        directory=Path(config.wandb_parent),
        run_config=config.run_config,
        # Its own group unless a sweep's: evaluate and export join it there.
        group=config.wandb_group or config.wandb_run_id,
        system_metrics=run.device.type == "cuda",
        job_type="train",
        export=config.wandb_export,
    )
    tracker.use_data(config.recipe.name, config.shards, config.run_config["data_version"])
    return tracker


def stop_on_request(run: Run, state: TrainingState, tracker: WandbRun, epoch: int) -> None:
    if run.rank == 0:
        say(
            f"stopped on request in epoch {epoch}; the checkpoint of epoch {state.epoch} is "
            "kept: run the same command again to resume"
        )
        _finish_wandb(run, tracker, preempted=True)


def finish(run: Run, state: TrainingState, tracker: WandbRun) -> None:
    """Rank 0: the best epoch's numbers as the W&B summary, and model.pt (the same file the
    driver writes, usable by `predict` as downloaded) as a model artifact."""
    if run.rank != 0:
        return
    if tracker.run is not None and load_best_weights(state) is not None:
        tracker.summarise_best(next(r for r in state.history if r["epoch"] == state.best_epoch))
        with tempfile.TemporaryDirectory() as folder:
            model_file = Path(folder) / "model.pt"
            write_best_model(model_file, run.config, state, run.classes)
            settings = run.config.run_config
            tracker.log_model(
                model_file,
                name=f"model-{run.config.run_name}",
                metadata={"epoch": state.best_epoch, run.train.monitor: state.best},
                aliases=artifact_aliases(
                    "best", settings.get("git_commit"), run.config.experiment_name
                ),
            )
    _finish_wandb(run, tracker, preempted=False)


def _finish_wandb(run: Run, tracker: WandbRun, preempted: bool) -> None:
    run_dir = tracker.directory
    tracker.finish(preempted=preempted)
    if run_dir is None or run.recipe.tracking.wandb.mode != "offline":
        return
    if run.config.wandb_export:  # set for offline runs with explicit storage
        # This node may be gone soon (autoscalers remove idle nodes): keep the run beside the
        # checkpoints, from where the driver copies it back.
        kept = export_wandb_run(run_dir, run.config.wandb_export)
        say(f"W&B offline run kept at {kept}")
    say(f"W&B offline run: {run_dir}  (share it: wandb sync {run_dir})")


# --------------------------------------------------------------------------- helpers
def _synced_batchnorm(train: TrainConfig, world: int) -> bool:
    """BatchNorm layers are SyncBatchNorm (see build_model): the ranks' buffers are equal."""
    return train.sync_batchnorm and world > 1


def _sync_buffers(model: nn.Module, world: int) -> None:
    """Give every rank rank 0's BatchNorm statistics before validating.

    DDP broadcasts buffers from rank 0 at the start of each training forward, but each rank's
    last forward still updated its own running statistics: without this, ranks would validate
    slightly different models, and not the one rank 0 checkpoints.
    """
    if world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _mean_across_ranks(total: torch.Tensor, count: int, world: int, device: torch.device) -> float:
    packed = torch.stack([total.float(), torch.tensor(float(count), device=device)])
    if world > 1:
        dist.all_reduce(packed)
    return (packed[0] / packed[1].clamp(min=1)).item()


def _cpu_copy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state_dict.items()}


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, int | float)}
