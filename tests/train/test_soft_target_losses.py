"""Losses with soft targets (MixUp / CutMix) and, unchanged, with integer labels."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnpipe.config import AugmentConfig, LossConfig
from attnpipe.data.batch_augment import BatchAugment
from attnpipe.train.losses import FocalLoss, build_loss

LOGITS = [[2.0, -1.0, 0.5], [0.1, 0.3, -0.7]]
SOFT = [[0.7, 0.0, 0.3], [0.0, 0.25, 0.75]]  # two mixed rows
COUNTS = [10, 30, 20]  # inverse-frequency weights 2, 2/3, 1


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def _hand_cross_entropy(smoothing: float = 0.0, weights=(1.0, 1.0, 1.0)) -> float:
    """mean_n -sum_c w_c t'_nc log p_nc, t' = (1 - eps) t + eps / C, in plain Python."""
    total = 0.0
    for logits, target in zip(LOGITS, SOFT, strict=True):
        probs = _softmax(logits)
        smoothed = [(1 - smoothing) * t + smoothing / len(target) for t in target]
        total -= sum(w * t * math.log(p) for w, t, p in zip(weights, smoothed, probs, strict=True))
    return total / len(LOGITS)


def _hand_focal(gamma: float, weights=(1.0, 1.0, 1.0)) -> float:
    """mean_n -sum_c w_c t_nc (1 - p_nc)^gamma log p_nc, in plain Python."""
    total = 0.0
    for logits, target in zip(LOGITS, SOFT, strict=True):
        probs = _softmax(logits)
        total -= sum(
            w * t * (1 - p) ** gamma * math.log(p)
            for w, t, p in zip(weights, target, probs, strict=True)
        )
    return total / len(LOGITS)


def _todays_focal(logits, target, gamma, weight=None) -> torch.Tensor:
    """FocalLoss.forward as it was before soft targets: the integer-label reference."""
    log_p_true = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
    loss = -((1 - log_p_true.exp()) ** gamma) * log_p_true
    if weight is not None:
        loss = loss * weight[target]
    return loss.mean()


# --------------------------------------------------------------------------- soft targets
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_with_soft_targets_equals_the_hand_computation(smoothing, weighted):
    config = LossConfig(
        label_smoothing=smoothing, class_weights="inverse_frequency" if weighted else "none"
    )
    loss = build_loss(config, COUNTS)(torch.tensor(LOGITS), torch.tensor(SOFT))
    weights = (2.0, 2 / 3, 1.0) if weighted else (1.0, 1.0, 1.0)
    # Weighted: the mean divides by N (2), not by a sum of weights as integer labels do.
    assert loss.item() == pytest.approx(_hand_cross_entropy(smoothing, weights), rel=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_focal_with_soft_targets_equals_the_hand_computation(gamma, weighted):
    config = LossConfig(
        name="focal",
        focal_gamma=gamma,
        class_weights="inverse_frequency" if weighted else "none",
    )
    loss = build_loss(config, COUNTS)(torch.tensor(LOGITS), torch.tensor(SOFT))
    weights = (2.0, 2 / 3, 1.0) if weighted else (1.0, 1.0, 1.0)
    assert loss.item() == pytest.approx(_hand_focal(gamma, weights), rel=1e-6)


def test_focal_with_gamma_zero_is_cross_entropy_with_soft_targets():
    logits, soft = torch.tensor(LOGITS), torch.tensor(SOFT)
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, soft), F.cross_entropy(logits, soft))


def test_focal_rejects_soft_targets_of_the_wrong_width():
    with pytest.raises(ValueError, match=r"soft targets must have the logits' shape"):
        FocalLoss()(torch.tensor(LOGITS), torch.tensor([[0.5, 0.5], [1.0, 0.0]]))


# --------------------------------------------------------------------------- integer labels
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name", ["cross_entropy", "focal"])
def test_integer_labels_give_todays_numbers(name, weighted):
    torch.manual_seed(0)
    logits, labels = torch.randn(9, 3), torch.tensor([0, 1, 2, 2, 1, 0, 1, 1, 2])
    weight = torch.tensor([2.0, 2 / 3, 1.0]) if weighted else None
    config = LossConfig(
        name=name,
        label_smoothing=0.1,
        focal_gamma=2.0,
        class_weights="inverse_frequency" if weighted else "none",
    )
    got = build_loss(config, COUNTS)(logits, labels)
    if name == "focal":  # focal has no label smoothing
        expected = _todays_focal(logits, labels, 2.0, weight)
    else:
        expected = F.cross_entropy(logits, labels, weight=weight, label_smoothing=0.1)
    assert torch.equal(got, expected)  # bit for bit


@pytest.mark.parametrize("name", ["cross_entropy", "focal"])
def test_one_hot_targets_give_the_integer_label_loss_without_class_weights(name):
    torch.manual_seed(1)
    logits, labels = torch.randn(9, 3), torch.tensor([0, 1, 2, 2, 1, 0, 1, 1, 2])
    criterion = build_loss(LossConfig(name=name, label_smoothing=0.1), COUNTS)
    one_hot = F.one_hot(labels, 3).float()
    torch.testing.assert_close(criterion(logits, one_hot), criterion(logits, labels))


# --------------------------------------------------------------------------- with mixing
@pytest.mark.parametrize(
    "loss",
    [
        LossConfig(),
        LossConfig(label_smoothing=0.1),
        LossConfig(name="focal", focal_gamma=2.0),
    ],
    ids=["ce", "ce-smoothed", "focal"],
)
@pytest.mark.parametrize(
    "augment",
    [AugmentConfig(mixup_alpha=0.4), AugmentConfig(cutmix_alpha=1.0)],
    ids=["mixup", "cutmix"],
)
def test_loss_of_a_mixed_batch_is_the_mix_of_the_two_label_losses(loss, augment):
    """All three losses are linear in the target: mixing targets with weight lam mixes the
    per-sample losses of the two labels with the same weight."""
    labels = torch.tensor([0, 1, 2, 3])
    mixer = BatchAugment(augment, num_classes=4)
    torch.manual_seed(3)
    images, targets = mixer(torch.randn(4, 3, 8, 8), labels)
    lam = targets[0, 0].item()
    logits = images.mean(dim=(2, 3)) @ torch.randn(3, 4)  # any logits of the mixed images
    criterion = build_loss(loss, [5, 5, 5, 5])
    per_sample = build_loss(loss, [5, 5, 5, 5])
    if isinstance(per_sample, torch.nn.CrossEntropyLoss):
        per_sample.reduction = "none"
        by_label = [per_sample(logits, labels), per_sample(logits, labels.roll(1))]
    else:
        by_label = [
            torch.stack([per_sample(logits[i : i + 1], y[i : i + 1]) for i in range(4)])
            for y in (labels, labels.roll(1))
        ]
    expected = (lam * by_label[0] + (1 - lam) * by_label[1]).mean()
    torch.testing.assert_close(criterion(logits, targets), expected)
