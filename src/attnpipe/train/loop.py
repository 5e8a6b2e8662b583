"""The per-worker training loop: reads like single-process PyTorch, runs as a DDP rank.

Ray starts one copy per worker. Each epoch: train on this rank's share of the shards, validate
on every validation sample exactly once across ranks (gathered, so all ranks hold the same
numbers and take the same early-stopping decision), then report a checkpoint. A restarted
worker group, or a re-launched run, continues from the latest checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from attnpipe.config import Recipe, TrainConfig
from attnpipe.data.loaders import (
    ShardStream,
    build_transform,
    make_loader,
    split_info,
    steps_per_epoch,
)
from attnpipe.metrics import classification_metrics, softmax
from attnpipe.models import create_model
from attnpipe.tracking import WandbRun
from attnpipe.train.losses import build_loss
from attnpipe.train.schedules import build_schedule
from attnpipe.train.session import RaySession, WorkerSession

CHECKPOINT_FILE = "checkpoint.pt"
# Set to a folder to have every rank write the sample ids it trained on, per epoch.
TRACE_ENV = "ATTNPIPE_TRACE_DIR"
# Steps between the ranks' checks for a stop request: one tiny all-reduce, a few ms of latency.
STOP_CHECK_STEPS = 10


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point: one call per worker."""
    run_training(config, RaySession(stop_name=config.get("stop_name")))


def run_training(config: dict[str, Any], session: WorkerSession) -> None:
    """The loop itself, for any launcher that provides a `WorkerSession`."""
    recipe = Recipe.model_validate(config["recipe"])
    train_cfg = recipe.train
    rank, world, device = session.rank, session.world_size, session.device
    torch.manual_seed(train_cfg.seed + rank)
    torch.set_num_threads(max(1, int(train_cfg.cpus_per_worker)))

    shards = config["shards"]
    train_split, val_split = split_info(shards, "train"), split_info(shards, "val")
    num_classes = len(train_split.classes)
    steps = steps_per_epoch(train_split.samples, world, train_cfg.batch_size)
    optimizer_steps = max(1, steps // train_cfg.accumulate_steps)

    model = create_model(recipe.model.name, num_classes=num_classes, **recipe.model.kwargs)
    memory_format = torch.channels_last if train_cfg.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(train_cfg.ema_decay))
        if (train_cfg.ema_decay)
        else None
    )
    ddp_model = session.prepare_model(model)
    if train_cfg.compile:
        ddp_model = torch.compile(ddp_model)

    optimizer = build_optimizer(model, train_cfg)
    schedule = build_schedule(optimizer, train_cfg.schedule, optimizer_steps, train_cfg.epochs)
    amp_dtype = resolve_amp(train_cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = build_loss(train_cfg.loss, train_split.class_counts).to(device)

    state = TrainingState()
    with session.latest_checkpoint() as folder:
        saved = (
            torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
            if folder
            else None
        )
    if saved:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        if ema is not None and saved.get("ema"):
            ema.load_state_dict(saved["ema"])
        torch.set_rng_state(saved["rng"][rank % len(saved["rng"])])
        state = TrainingState.from_dict(saved["state"])
        state.resumed_from.append(state.epoch)
        if rank == 0:
            say(f"resuming from the checkpoint of epoch {state.epoch} (of {train_cfg.epochs})")

    train_stream = ShardStream(
        urls=train_split.urls,
        rank=rank,
        world_size=world,
        transform=build_transform(recipe.augment, recipe.model.input_size, train=True),
        train=True,
        seed=train_cfg.seed,
        shuffle_buffer=train_cfg.shuffle_buffer,
    )
    val_stream = ShardStream(
        urls=val_split.urls,
        rank=rank,
        world_size=world,
        transform=build_transform(recipe.augment, recipe.model.input_size, train=False),
        train=False,
    )
    pin = device.type == "cuda"
    tracker = WandbRun(None)
    if rank == 0:
        tracker = WandbRun.start(
            recipe.tracking.wandb,
            run_id=config["wandb_run_id"],
            name=config["run_name"],
            directory=Path(config["wandb_parent"]),
            run_config=config["run_config"],
            group=config.get("wandb_group"),
        )
    trace_dir = os.environ.get(TRACE_ENV)
    _trace(trace_dir, session, config["run_name"], event="start", epoch=state.epoch)

    started, first_epoch = time.perf_counter(), state.epoch
    stopped_in_epoch = None
    for epoch in range(state.epoch, train_cfg.epochs):
        _trace(trace_dir, session, config["run_name"], event="epoch", epoch=epoch + 1)
        train_stream.set_epoch(epoch)
        ddp_model.train()
        loader = make_loader(train_stream, train_cfg.batch_size, train_cfg.loader_workers, device)
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        seen_ids: list[str] = []
        optimizer.zero_grad(set_to_none=True)
        for step, (images, labels, ids) in zip(range(steps), loader, strict=False):
            images = images.to(device, non_blocking=pin, memory_format=memory_format)
            labels = labels.to(device, non_blocking=pin)
            last_micro = (step + 1) % train_cfg.accumulate_steps == 0 or step + 1 == steps
            sync = nullcontext() if last_micro or world == 1 else ddp_model.no_sync()
            with sync, torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = criterion(ddp_model(images), labels)
                scaler.scale(loss / train_cfg.accumulate_steps).backward()
            if last_micro:
                if train_cfg.grad_clip_norm:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                if ema is not None:
                    ema.update_parameters(model)
            loss_sum += loss.detach() * labels.shape[0]
            seen += labels.shape[0]
            if trace_dir:
                seen_ids.extend(ids)
            if (step + 1) % STOP_CHECK_STEPS == 0 and _stop_agreed(session, device):
                stopped_in_epoch = epoch + 1
                break
        if stopped_in_epoch is not None:
            break
        train_seconds = time.perf_counter() - epoch_start
        if trace_dir:
            trace = Path(trace_dir) / f"epoch{epoch + 1}-rank{rank}.txt"
            trace.parent.mkdir(parents=True, exist_ok=True)
            trace.write_text("\n".join(seen_ids) + "\n")

        _trace(trace_dir, session, config["run_name"], event="validate", epoch=epoch + 1)
        eval_model = ema.module if ema is not None else model
        _sync_buffers(eval_model, world)
        val = evaluate_split(eval_model, val_stream, recipe, device, memory_format, amp_dtype)
        train_loss = _mean_across_ranks(loss_sum, seen, world, device)
        state.epoch = epoch + 1
        row = {
            "epoch": state.epoch,
            "train_loss": train_loss,
            "lr": schedule.get_last_lr()[0],
            **{f"val_{k}": v for k, v in val.items()},
            "train_images_per_s": seen * world / max(train_seconds, 1e-9),
            "epoch_seconds": time.perf_counter() - epoch_start,
        }
        improved = state.record(row, train_cfg.monitor)
        if improved:
            state.best_weights = {
                k: v.detach().cpu().clone() for k, v in eval_model.state_dict().items()
            }
        stop = state.should_stop(train_cfg.early_stopping_patience)

        overlays = []
        if tracker.run is not None and state.finished(train_cfg):
            # In the last epoch's row rather than after it: every row is committed when logged.
            overlays = best_model_overlays(
                eval_model, state.best_weights, val_stream, recipe, train_split.classes
            )
        tracker.log(row, step=state.epoch, images={"attention_overlays": overlays})
        if rank == 0:
            per_epoch = (time.perf_counter() - started) / (state.epoch - first_epoch)
            say(_epoch_line(row, state, train_cfg, per_epoch * (train_cfg.epochs - state.epoch)))
        _trace(trace_dir, session, config["run_name"], event="checkpoint", epoch=epoch + 1)
        with tempfile.TemporaryDirectory() as folder:
            checkpoint_dir = None
            if rank == 0:
                payload = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": schedule.state_dict(),
                    "scaler": scaler.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "rng": _gather_rng_states(world, device),
                    "state": state.to_dict(),
                }
                checkpoint_dir = Path(folder)
                torch.save(payload, checkpoint_dir / CHECKPOINT_FILE)
            else:
                _gather_rng_states(world, device)
            session.report(_scalars(row), checkpoint_dir)
        if stop:
            if rank == 0:
                say(
                    f"early stopping: {train_cfg.monitor} did not improve for "
                    f"{train_cfg.early_stopping_patience} epochs"
                )
            break
    if stopped_in_epoch is not None:
        if rank == 0:
            say(
                f"stopped on request in epoch {stopped_in_epoch}; the checkpoint of epoch "
                f"{state.epoch} is kept: run the same command again to resume"
            )
            tracker.finish(preempted=True)
        return
    if rank == 0:
        tracker.summary({"best_epoch": state.best_epoch, f"best_{train_cfg.monitor}": state.best})
        if tracker.run is not None and state.best_weights is not None:
            with tempfile.TemporaryDirectory() as folder:
                weights = Path(folder) / "best_weights.pt"
                torch.save(state.best_weights, weights)
                tracker.log_model(
                    weights,
                    name=f"model-{config['run_name']}",
                    metadata={"epoch": state.best_epoch, train_cfg.monitor: state.best},
                )
        run_dir = tracker.directory
        tracker.finish()
        if run_dir is not None and recipe.tracking.wandb.mode == "offline":
            say(f"W&B offline run: {run_dir}  (share it: wandb sync {run_dir})")


def _stop_agreed(session: WorkerSession, device: torch.device) -> bool:
    """Whether any rank saw a stop request: all ranks must leave at the same step, or DDP hangs."""
    wanted = session.stop_requested()
    if session.world_size == 1:
        return wanted
    flag = torch.tensor([int(wanted)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _trace(folder: str | None, session: WorkerSession, run: str, **event: Any) -> None:
    """Append where and when this rank is (pid, node, epoch) to `<folder>/rank<r>.jsonl`.

    Off unless ATTNPIPE_TRACE_DIR is set: for debugging placement and for the tests that kill
    a worker at a chosen epoch.
    """
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    event.update(run=run, pid=os.getpid(), node_id=session.node_id, time=time.time())
    with (Path(folder) / f"rank{session.rank}.jsonl").open("a") as handle:
        handle.write(json.dumps(event) + "\n")


def say(line: str) -> None:
    """One line to the worker's real stdout, which Ray streams to the driver.

    Ray Train patches `print` into its logger, and W&B wraps sys.stdout; with both, a plain
    print would appear twice.
    """
    stream = sys.__stdout__ or sys.stdout
    stream.write(line + "\n")
    stream.flush()


OVERLAY_IMAGES = 8


def best_model_overlays(
    model: nn.Module,
    best_weights: dict[str, torch.Tensor] | None,
    stream: ShardStream,
    recipe: Recipe,
    classes: list[str],
) -> list[tuple[np.ndarray, str]]:
    """A few validation images beside the best model's attention maps (none without maps).

    Drawn on a copy: `model` keeps training weights, the next checkpoint saves those.
    """
    from attnpipe.evaluate.figures import attention_examples

    best = copy.deepcopy(model)
    if best_weights is not None:
        best.load_state_dict(best_weights)
    images, labels, ids = next(iter(make_loader(stream, OVERLAY_IMAGES, workers=0)))
    return attention_examples(
        best, images, labels.tolist(), classes, recipe.augment.mean, recipe.augment.std, ids=ids
    )


class TrainingState:
    """Epoch counter, history and best-so-far: everything a resumed run must not forget."""

    def __init__(self) -> None:
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best: float | None = None
        self.best_epoch = 0
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.resumed_from: list[int] = []  # epochs a restarted or re-launched run went on from

    def record(self, row: dict[str, Any], monitor: str) -> bool:
        self.history.append(row)
        value = row[monitor]
        lower_is_better = monitor.endswith("loss")
        if value != value:  # NaN never improves
            return False
        better = self.best is None or (value < self.best if lower_is_better else value > self.best)
        if better:
            self.best, self.best_epoch = float(value), self.epoch
        return better

    def should_stop(self, patience: int | None) -> bool:
        return patience is not None and self.epoch - self.best_epoch >= patience

    def finished(self, train_cfg: TrainConfig) -> bool:
        """All epochs trained, or early stopping ended the run."""
        return self.epoch >= train_cfg.epochs or self.should_stop(train_cfg.early_stopping_patience)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "history": self.history,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "best_weights": self.best_weights,
            "resumed_from": self.resumed_from,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingState:
        state = cls()
        state.epoch = data["epoch"]
        state.history = list(data["history"])
        state.best = data["best"]
        state.best_epoch = data["best_epoch"]
        state.best_weights = data["best_weights"]
        state.resumed_from = list(data.get("resumed_from", []))
        return state


@torch.no_grad()
def evaluate_split(
    model: nn.Module,
    stream: ShardStream,
    recipe: Recipe,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Loss and metrics over every sample of `stream`'s split, gathered from all ranks.

    Runs on the unwrapped model: DDP's forward is a collective, and ranks may hold different
    numbers of evaluation batches.
    """
    logits, labels = predict_stream(model, stream, recipe, device, memory_format, amp_dtype)
    logits, labels = gather_arrays(logits, labels)
    if len(labels) == 0:
        raise RuntimeError("the validation split is empty: give prepare.splits.val a share")
    loss = nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    scores = classification_metrics(labels, softmax(logits), recipe.evaluate.threshold)
    return {"loss": loss, **scores}


def predict_stream(
    model: nn.Module,
    stream: ShardStream,
    recipe: Recipe,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
    amp_dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    was_training = model.training
    model.eval()
    loader = make_loader(stream, recipe.evaluate.batch_size, recipe.train.loader_workers)
    all_logits, all_labels = [], []
    with torch.no_grad():
        for images, labels, _ in loader:
            images = images.to(device, memory_format=memory_format)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                all_logits.append(model(images).float().cpu())
            all_labels.append(labels)
    model.train(was_training)
    if not all_logits:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return torch.cat(all_logits).numpy(), torch.cat(all_labels).numpy()


def gather_arrays(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate every rank's predictions (the same result on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return logits, labels
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (logits, labels))
    non_empty = [p for p in parts if len(p[1])]
    if not non_empty:
        return logits, labels
    return (np.concatenate([p[0] for p in non_empty]), np.concatenate([p[1] for p in non_empty]))


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


def resolve_amp(setting: str, device: torch.device) -> torch.dtype | None:
    """'auto' means bf16 on GPUs that have it, fp16 on older GPUs, and full precision on CPU."""
    if setting == "off":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp16":
        return torch.float16
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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


def _gather_rng_states(world: int, device: torch.device) -> list[torch.Tensor]:
    state = torch.get_rng_state()
    if world == 1:
        return [state]
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, state)
    return parts


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, int | float)}


def _epoch_line(row: dict[str, Any], state: TrainingState, config: TrainConfig, eta: float) -> str:
    metric = config.monitor
    return (
        f"epoch {state.epoch}/{config.epochs}  train_loss {row['train_loss']:.4f}  "
        f"val_loss {row['val_loss']:.4f}  val_accuracy {row['val_accuracy']:.4f}  "
        f"{metric} best {state.best:.4f} (epoch {state.best_epoch})  "
        f"{row['train_images_per_s']:.0f} img/s  ETA {_duration(eta)}"
    )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
