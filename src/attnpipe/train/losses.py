"""Losses selected by `train.loss` in a recipe.

Both take integer labels (N,) or soft targets (N, C), rows summing to 1, as MixUp and CutMix
make them (`attnpipe.data.batch_augment`). With integer labels the numbers are exactly what
they were before soft targets existed.

Cross-entropy is torch's `nn.CrossEntropyLoss`, which accepts both. With soft targets t:
    loss = mean_n [ -sum_c w_c * t'_nc * log p_nc ],   t' = (1 - eps) * t + eps / C
so label smoothing eps is applied to the soft targets as to one-hot ones, and a one-hot t
gives the integer-label loss exactly when there are no class weights. With class weights the
mean divides by N, where integer labels divide by sum_n w_{y_n}; the inverse-frequency weights
average 1 over the training distribution, so the two agree in expectation (not per batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnpipe.config import LossConfig


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true) ** gamma.

    Integer labels y:  loss_n = -w_y * (1 - p_ny) ** gamma * log p_ny
    Soft targets t:    loss_n = -sum_c w_c * t_nc * (1 - p_nc) ** gamma * log p_nc
    i.e. the focal term of each class, weighted by the target distribution (a one-hot t gives
    the integer-label loss). Either way the loss is the mean over the batch (divided by N,
    with or without class weights w). No label smoothing.
    """

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits.float(), dim=1)
        if target.dim() == 2:
            return self._soft(log_probs, target.float())
        log_p_true = log_probs.gather(1, target[:, None]).squeeze(1)
        loss = -((1 - log_p_true.exp()) ** self.gamma) * log_p_true
        if self.weight is not None:
            loss = loss * self.weight[target]
        return loss.mean()

    def _soft(self, log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.shape != log_probs.shape:
            raise ValueError(
                f"soft targets must have the logits' shape (N, classes) = "
                f"{tuple(log_probs.shape)}, got {tuple(target.shape)}"
            )
        per_class = -((1 - log_probs.exp()) ** self.gamma) * log_probs * target
        if self.weight is not None:
            per_class = per_class * self.weight
        return per_class.sum(1).mean()


def class_weights(counts: list[int]) -> torch.Tensor:
    """Inverse-frequency weights, scaled so that a balanced dataset gets all ones."""
    tensor = torch.tensor(counts, dtype=torch.float32).clamp(min=1)
    return tensor.sum() / (len(counts) * tensor)


def build_loss(config: LossConfig, class_counts: list[int]) -> nn.Module:
    weight = class_weights(class_counts) if config.class_weights == "inverse_frequency" else None
    if config.name == "focal":
        return FocalLoss(config.focal_gamma, weight)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
