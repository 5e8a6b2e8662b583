"""An exponential moving average of the weights that never waits for the GPU.

torch's `AveragedModel` keeps its step counter (`n_averaged`) on the CPU and asks
`bool(n_averaged == 0)` / `n_averaged > 0` on every update, and copies the counter to the
device for its averaging function: with the counter on the device those questions would be a
host-device synchronisation per optimizer step. Here the counter lives on the device for the
checkpoint, a host-side mirror answers "first update?", and the average is one fused
`_foreach_lerp_` per dtype group. The state dict keeps `AveragedModel`'s layout (`module.*`,
`n_averaged`), so checkpoints of either load into the other.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_step_decay(decay: float, global_batch: int, reference_batch: int) -> float:
    """The decay per optimizer step of `train.ema_decay`, which is given per `reference_batch`
    images (`optimizer.reference_batch`): decay ** (global_batch / reference_batch). Per step,
    the average's horizon in images would grow with the world size (twice the ranks, twice the
    images per step); per image, it is the same on 1 GPU or 16."""
    return decay ** (global_batch / reference_batch)


class DeviceEma(AveragedModel):
    """EMA of a model's parameters and buffers (BatchNorm statistics averaged too)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        device = next(model.parameters()).device
        super().__init__(model, device=device, use_buffers=True)
        self.decay = decay
        self._updates = 0  # host mirror of n_averaged: no device read per step

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        averaged = list(itertools.chain(self.module.parameters(), self.module.buffers()))
        current = list(itertools.chain(model.parameters(), model.buffers()))
        floats = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
        others = [
            (a, c) for a, c in zip(averaged, current, strict=True) if not a.is_floating_point()
        ]
        if self._updates == 0:
            torch._foreach_copy_([a for a, _ in floats], [c for _, c in floats])
        elif floats:
            # ema = decay * ema + (1 - decay) * current
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - self.decay)
        for a, c in others:  # integer counters (num_batches_tracked): follow the model
            a.copy_(c)
        self.n_averaged.add_(1)
        self._updates += 1

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._updates = int(self.n_averaged.item())  # once, on resume
        return result
