"""Losses selected by `train.loss` in a recipe."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnpipe.config import LossConfig


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true) ** gamma."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits.float(), dim=1)
        log_p_true = log_probs.gather(1, target[:, None]).squeeze(1)
        loss = -((1 - log_p_true.exp()) ** self.gamma) * log_p_true
        if self.weight is not None:
            loss = loss * self.weight[target]
        return loss.mean()


def class_weights(counts: list[int]) -> torch.Tensor:
    """Inverse-frequency weights, scaled so that a balanced dataset gets all ones."""
    tensor = torch.tensor(counts, dtype=torch.float32).clamp(min=1)
    return tensor.sum() / (len(counts) * tensor)


def build_loss(config: LossConfig, class_counts: list[int]) -> nn.Module:
    weight = class_weights(class_counts) if config.class_weights == "inverse_frequency" else None
    if config.name == "focal":
        return FocalLoss(config.focal_gamma, weight)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
