"""Building one rank's run: model, DDP, optimizer, schedule and data streams (`Run`).

Built once per attempt (a restarted worker group or a re-launched run builds again, with the
world size it has now).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
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
from attnpipe.data.transforms import evaluation_size, evaluation_transform
from attnpipe.devices import describe_amp, memory_format_for, resolve_amp
from attnpipe.models import create_model
from attnpipe.train.ema import DeviceEma, ema_step_decay
from attnpipe.train.loop_config import LoopConfig
from attnpipe.train.losses import build_loss
from attnpipe.train.repeatability import apply_determinism, loader_generator
from attnpipe.train.reporting import Tracer, say
from attnpipe.train.schedules import LrSchedule, global_batch_size, scaled_lr
from attnpipe.train.session import WorkerSession


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
    train_stream = build_stream(recipe, train_split.shards, session, train=True)
    val_stream = build_stream(recipe, val_split.shards, session, train=False)
    train_loader = build_loader(train_stream, train.batch_size, train, session, memory_format, 0)
    val_loader = build_loader(
        val_stream, recipe.evaluate.batch_size, train, session, memory_format, 1
    )
    steps = len(train_loader)  # the same on every rank
    model = build_model(recipe, len(train_split.classes), session, memory_format)
    global_batch = global_batch_size(train, session.world_size)
    # The EMA network keeps averaged BatchNorm statistics of its own, not its initial ones.
    ema = None
    if train.ema_decay:
        decay = ema_step_decay(train.ema_decay, global_batch, train.optimizer.reference_batch)
        ema = DeviceEma(model, decay)
    # SyncBatchNorm already gives every rank the same statistics: DDP's broadcast of the
    # buffers before each forward would copy what is equal.
    ddp_model = session.prepare_model(
        model, forward_sync_buffers=not synced_batchnorm(train, session.world_size)
    )
    if train.compile:
        ddp_model = torch.compile(ddp_model)
    optimizer = build_optimizer(model, train)
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
    summary = getattr(model, "pretrained_summary", None)
    if summary and session.rank == 0:  # which tensors came from the file, said once
        say(summary)
    if recipe.train.sync_batchnorm and session.world_size > 1:
        # BatchNorm statistics over the global batch: small per-GPU batches stay stable.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device=session.device, memory_format=memory_format)


def build_loader(
    stream: ShardStream,
    batch_size: int,
    train: TrainConfig,
    session: WorkerSession,
    memory_format: torch.memory_format,
    purpose: int,
) -> ShardLoader:
    """Built once per run: with loader workers, they persist across epochs (the stream's
    `set_epoch` reaches them through shared memory). Augmentation draws from a seed per sample
    that the stream derives from (seed, epoch, rank, reader), whatever the workers' own seeds;
    those come from a generator fixed by the recipe, the rank and `purpose` (0 training, 1
    validation), so nothing depends on what the main process drew before."""
    return make_loader(
        stream,
        batch_size,
        train.loader_workers,
        session.device,
        memory_format,
        persistent=train.loader_workers > 0,
        generator=loader_generator(train.seed + purpose, session.rank),
    )


def build_stream(
    recipe: Recipe, shards: list[ShardEntry], session: WorkerSession, train: bool
) -> ShardStream:
    # Seed and shuffle buffer shape training's plan and order; evaluation reads in order.
    if train:
        transform = build_transform(recipe.augment, recipe.model.input_size, train=True)
    else:  # validation measures as the test will: the best epoch is chosen by it
        transform = evaluation_transform(recipe, evaluation_size(recipe, recipe.model.input_size))
    return ShardStream(
        shards,
        rank=session.rank,
        world_size=session.world_size,
        transform=transform,
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


def synced_batchnorm(train: TrainConfig, world: int) -> bool:
    """BatchNorm layers are SyncBatchNorm (see build_model): the ranks' buffers are equal."""
    return train.sync_batchnorm and world > 1
