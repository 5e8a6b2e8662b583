"""Learning-rate schedules in optimizer steps, with the base rate scaled to the global batch.

The schedule's only state is its step count, and a run resumes at an epoch boundary: the
position is set from the training samples seen so far (`set_position_by_samples`), counted in
epochs of the *current* world size and then in its optimizer steps. A run resumed on a different
number of ranks (an elastic run that lost or regained nodes: other steps per epoch, and other
samples per epoch, since each epoch drops the remainder of world_size x batch_size) thus
continues where the samples it has trained on put it, not where its step count would.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer

from attnpipe.config import OptimizerConfig, ScheduleConfig


def lr_factor(step: int, total_steps: int, warmup_steps: int, config: ScheduleConfig) -> float:
    """Multiplier of the base learning rate during optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if config.name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if config.name == "multistep":
        passed = sum(step >= m * total_steps for m in config.milestones)
        return config.gamma**passed
    return 1.0


def scaled_lr(config: OptimizerConfig, global_batch: int) -> float:
    """`optimizer.lr` is the rate at `reference_batch`; scale it to this run's global batch."""
    ratio = global_batch / config.reference_batch
    if config.scale_lr == "linear":
        return config.lr * ratio
    if config.scale_lr == "sqrt":
        return config.lr * math.sqrt(ratio)
    return config.lr


class LrSchedule:
    """Sets every parameter group's rate to `base_lr x lr_factor(step)` before each step."""

    def __init__(
        self,
        optimizer: Optimizer,
        config: ScheduleConfig,
        base_lr: float,
        steps_per_epoch: int,
        epochs: int,
    ) -> None:
        self.optimizer = optimizer
        self.config = config
        self.base_lr = base_lr
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * epochs
        self.warmup_steps = round(config.warmup_epochs * steps_per_epoch)
        self.step_count = 0
        self._apply()

    def step(self) -> None:
        """After an optimizer step: the rate of the next one."""
        self.step_count += 1
        self._apply()

    def set_position(self, epochs_done: float) -> None:
        """Continue after `epochs_done` epochs of this world size (a resumed run)."""
        self.step_count = round(epochs_done * self.steps_per_epoch)
        self._apply()

    def set_position_by_samples(self, samples_seen: int, samples_per_epoch: int) -> None:
        """Continue after `samples_seen` training samples, whatever world sizes trained them;
        `samples_per_epoch`: what one epoch of this world size trains on (all ranks)."""
        self.set_position(samples_seen / samples_per_epoch)

    def factor(self) -> float:
        return lr_factor(self.step_count, self.total_steps, self.warmup_steps, self.config)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def _apply(self) -> None:
        rate = self.base_lr * self.factor()
        for group in self.optimizer.param_groups:
            group["lr"] = rate
