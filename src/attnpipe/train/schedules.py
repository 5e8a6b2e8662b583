"""Learning-rate schedules in optimizer steps, with the base rate scaled to the global batch.

The schedule's only state is its step count. A resumed run's position is set from the training
samples of its finished epochs (`set_position_by_samples`), counted in epochs of the *current*
world size and then in its optimizer steps, plus the steps of a partly trained epoch that a
mid-epoch checkpoint holds (`advance`). A run resumed on a different
number of ranks (an elastic run that lost or regained nodes: other steps per epoch, and other
samples per epoch, since each epoch drops the remainder of world_size x batch_size) thus
continues where the samples it has trained on put it, not where its step count would. With
`scale_lr`, a run that grew also gets a higher base rate: it re-warms to it over
`train.rewarm_steps` steps (`rewarm_plan`, `LrSchedule.rewarm`).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer

from attnpipe.config import OptimizerConfig, ScheduleConfig, TrainConfig


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


def global_batch_size(train: TrainConfig, world_size: int) -> int:
    """Images per optimizer step over all ranks: what `scaled_lr` scales to (`attnpipe plan`
    says the same number)."""
    return world_size * train.batch_size * train.accumulate_steps


def scaled_lr(config: OptimizerConfig, global_batch: int) -> float:
    """`optimizer.lr` is the rate at `reference_batch`; scale it to this run's global batch."""
    ratio = global_batch / config.reference_batch
    if config.scale_lr == "linear":
        return config.lr * ratio
    if config.scale_lr == "sqrt":
        return config.lr * math.sqrt(ratio)
    return config.lr


def rewarm_plan(
    worlds: list[int | None], world: int, steps_per_epoch: int, rewarm_steps: int
) -> tuple[int, int] | None:
    """Whether a run resumed on `world` ranks is re-warming after it grew: (the world size
    before the growth, optimizer steps already trained since), or None.

    `worlds`: the world size of each trained epoch (the history's rows). The ramp is worked
    out from them rather than saved, so that a restart in the middle of it (an epoch shorter
    than the ramp) goes on with it instead of jumping to the full rate.
    """
    if rewarm_steps <= 0:
        return None
    since = 0  # epochs trained at this world size since the last change
    for trained_on in reversed(worlds):
        if trained_on != world:
            break
        since += 1
    else:
        return None  # no change of world size (or none recorded)
    before = worlds[len(worlds) - 1 - since]
    done = since * steps_per_epoch
    if before is None or before >= world or done >= rewarm_steps:
        return None
    return before, done


class LrSchedule:
    """Sets every parameter group's rate to `base_lr x lr_factor(step)` before each step;
    after a growth of the world size (`rewarm`), with the base rate ramped up to `base_lr`."""

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
        self._rewarm: tuple[int, float, int] | None = None  # (first step, base before, steps)
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

    def advance(self, steps: int) -> None:
        """Continue `steps` optimizer steps further: those of a partly trained epoch that a
        mid-epoch checkpoint holds (whole epochs are placed by `set_position_by_samples`)."""
        self.step_count += steps
        self._apply()

    def rewarm(self, from_base_lr: float, steps: int, done: int = 0) -> None:
        """Ramp the base rate linearly from `from_base_lr` (what the smaller world trained at)
        to `base_lr` over `steps` optimizer steps, `done` of which are already trained, from
        the current position: a run that grew (8 to 16 ranks) does not double its rate at
        once. The schedule's factor (warmup, cosine...) applies on top."""
        if steps > 0 and from_base_lr < self.base_lr:
            self._rewarm = (self.step_count - done, from_base_lr, steps)
            self._apply()

    def current_base(self) -> float:
        """The base rate of the current step: `base_lr`, or on the way to it after a growth."""
        if self._rewarm is None:
            return self.base_lr
        first, before, steps = self._rewarm
        done = min(1.0, (self.step_count - first + 1) / steps)
        return before + (self.base_lr - before) * done

    def factor(self) -> float:
        return lr_factor(self.step_count, self.total_steps, self.warmup_steps, self.config)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def _apply(self) -> None:
        rate = self.current_base() * self.factor()
        for group in self.optimizer.param_groups:
            group["lr"] = rate
