"""Learning-rate schedules as a per-step factor, so resuming needs only the step count."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from attnpipe.config import ScheduleConfig


def lr_factor(step: int, total_steps: int, warmup_steps: int, config: ScheduleConfig) -> float:
    """Multiplier of the base learning rate after `step` optimiser steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if config.name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if config.name == "multistep":
        passed = sum(step >= m * total_steps for m in config.milestones)
        return config.gamma**passed
    return 1.0


def build_schedule(
    optimizer: Optimizer, config: ScheduleConfig, steps_per_epoch: int, epochs: int
) -> LambdaLR:
    total = steps_per_epoch * epochs
    warmup = round(config.warmup_epochs * steps_per_epoch)
    return LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, config))
