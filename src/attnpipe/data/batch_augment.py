"""Batch-level augmentation, on the device after normalisation: random erasing, MixUp, CutMix.

    batch_augment = BatchAugment(recipe.augment, num_classes)
    images, targets = batch_augment(images, labels)   # in the training step only

Random erasing blanks one rectangle per image (each image its own box and its own coin flip,
as timm does; torchvision's transform on a 4-D tensor would erase the same box in every
image). MixUp and CutMix pair each image with its predecessor in the batch (torchvision's
`MixUp`/`CutMix`; the loader shuffles, so the pairs are random) and turn the integer labels
into soft targets (N, C) float32: the two one-hot rows weighted by the share of each image.

All random numbers come from torch's global (CPU) generator, which the training loop seeds,
so runs repeat exactly. With every switch off the call returns its inputs untouched and draws
nothing: the random stream, and so a recipe's results, are what they were without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from attnpipe.config import AugmentConfig


class BatchAugment:
    """`(images (N, C, H, W) float, labels (N,) int64) -> (images, targets)`.

    `targets` are the labels themselves when MixUp and CutMix are off, and soft targets
    (N, num_classes) float32 whenever either is on, also for the batches that `mix_prob`
    leaves unmixed (one-hot rows then), so the loss sees one kind of target for a whole run.
    """

    def __init__(self, config: AugmentConfig, num_classes: int):
        self.num_classes = num_classes
        self.erasing_p = config.random_erasing
        # Only its parameter sampler is used: the box of torchvision's RandomErasing, drawn
        # from the same random numbers in the same order.
        self._eraser = v2.RandomErasing(p=1.0, value=0.0)
        self.mix_prob = config.mix_prob
        mixers: list[v2.Transform] = []
        if config.mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=config.mixup_alpha, num_classes=num_classes))
        if config.cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=config.cutmix_alpha, num_classes=num_classes))
        # Both on: one of the two per batch, with equal chances (timm's switch_prob 0.5).
        self._mix: v2.Transform | None = (
            v2.RandomChoice(mixers) if len(mixers) > 1 else (mixers[0] if mixers else None)
        )

    @property
    def mixing(self) -> bool:
        """Whether targets come out soft (N, num_classes) rather than integer labels."""
        return self._mix is not None

    @property
    def enabled(self) -> bool:
        return self.mixing or self.erasing_p > 0

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.enabled:
            return images, labels
        if images.dim() != 4 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"batch augmentation wants images (N, C, H, W) and labels (N,), got "
                f"{tuple(images.shape)} and {tuple(labels.shape)}: pass one batch of each"
            )
        if self.erasing_p > 0:
            images = self.erase(images)
        if self._mix is None:
            return images, labels
        if self.mix_prob < 1 and torch.rand(()).item() >= self.mix_prob:
            return images, F.one_hot(labels, self.num_classes).float()
        return self._mix(images, labels)

    def erase(self, images: torch.Tensor) -> torch.Tensor:
        """A copy of `images` with, per image and with probability `erasing_p`, one rectangle
        set to 0 (the mean, after normalisation)."""
        images = images.clone()
        for image in images:
            if torch.rand(1).item() >= self.erasing_p:  # as torchvision's own coin flip
                continue
            box = self._eraser.make_params([image])
            if box["v"] is None:  # no box fitted in ten tries: torchvision leaves it as is
                continue
            top, left, height, width = box["i"], box["j"], box["h"], box["w"]
            image[:, top : top + height, left : left + width] = 0.0
        return images
