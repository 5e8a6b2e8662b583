"""Decoding a shard's samples and the per-image transforms (uint8 in, normalised float out)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2

from attnpipe.config import AugmentConfig, Recipe

IMAGE_KEYS = ("jpg", "png")


class ImageTransform:
    """uint8 CHW image -> normalised float CHW tensor, in two halves.

    `augment` (crop, flips, ... on uint8) runs per sample in the loader's workers;
    `normalize` (to float, minus mean, over std) runs on whole batches in the main process,
    which is what `make_loader` does: samples cross between processes as uint8 (a quarter of
    the bytes, and shared-memory pages are costly to create). Calling the object does both,
    so it is a drop-in `transform`.
    """

    def __init__(self, augment: Callable, mean: Sequence[float], std: Sequence[float]):
        self.augment = augment
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_t

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.augment(image))

    def normalize(self, images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x / 255 -> (x - mean) / std for one image (C, H, W) or a batch (N, C, H, W).

        A batch is done image by image so that each one's three passes stay in cache.
        """
        if out is None:
            out = torch.empty(images.shape, dtype=torch.float32)
        if images.dim() == 3:
            return out.copy_(images).mul_(self.scale).add_(self.shift)
        for source, target in zip(images, out, strict=True):
            target.copy_(source).mul_(self.scale).add_(self.shift)
        return out


class _RandomResizedCrop:
    """torchvision's RandomResizedCrop: the same box from the same random numbers (drawn by
    the v2 transform itself) and the same antialiased bilinear resize, bit for bit. It skips
    v2's per-call dispatch and resizes the crop in place of memory layout: decoded JPEGs are
    channels-last, the layout of torch's fast uint8 kernel, so nothing is copied first."""

    def __init__(self, size: int, scale, ratio):
        self.size = (size, size)
        self.sampler = v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        box = self.sampler.make_params([image])
        top, left = box["top"], box["left"]
        crop = image[..., top : top + box["height"], left : left + box["width"]]
        return torch.nn.functional.interpolate(
            crop.unsqueeze(0), size=self.size, mode="bilinear", antialias=True, align_corners=False
        )[0]


class _RandomFlip:
    def __init__(self, p: float, dim: int):
        self.p, self.dim = p, dim

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.flip(self.dim) if torch.rand(1).item() < self.p else image


def resize_for_crop(crop: int, crop_ratio: float) -> int:
    """The shorter side to resize to before a centre crop of `crop` (224 at 0.875: 256)."""
    return max(crop, round(crop / crop_ratio))


def build_transform(
    augment: AugmentConfig, input_size: int, train: bool, crop_ratio: float = 1.0
) -> ImageTransform:
    """uint8 CHW tensor -> normalised float CHW tensor of `input_size`.

    Evaluation: the shorter side resized to `input_size / crop_ratio`, then the centre
    `input_size` square (`crop_ratio` 0.875 at 224: resize 256, crop 224, the protocol every
    ImageNet number is quoted with; 1.0 crops only the longer side).

    Training: the random crop, then flips, rotation, RandAugment or TrivialAugmentWide and
    colour jitter, each only when the recipe turns it on (so the default pipeline, and the
    random numbers it draws, are what they were before those switches existed). Random
    erasing, MixUp and CutMix work on whole batches: `attnpipe.data.batch_augment`.
    """
    if not train:
        steps: list[Callable] = [
            v2.Resize(resize_for_crop(input_size, crop_ratio), antialias=True),
            v2.CenterCrop(input_size),
        ]
        return ImageTransform(v2.Compose(steps), augment.mean, augment.std)
    steps = [
        _RandomResizedCrop(
            input_size, augment.random_resized_crop_scale, augment.random_resized_crop_ratio
        )
    ]
    if augment.horizontal_flip:
        steps.append(_RandomFlip(augment.horizontal_flip, dim=-1))
    if augment.vertical_flip:
        steps.append(_RandomFlip(augment.vertical_flip, dim=-2))
    if augment.rotation_degrees:
        steps.append(v2.RandomRotation(augment.rotation_degrees))
    if augment.auto_augment == "randaugment":
        steps.append(v2.RandAugment(augment.randaugment_num_ops, augment.randaugment_magnitude))
    elif augment.auto_augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide())
    if augment.color_jitter:
        strength = augment.color_jitter
        steps.append(v2.ColorJitter(strength, strength, strength))
    return ImageTransform(v2.Compose(steps), augment.mean, augment.std)


def evaluation_size(recipe: Recipe, trained_size: int) -> int:
    """`evaluate.image_size`, else the size the model was trained at."""
    return recipe.evaluate.image_size or trained_size


def evaluation_transform(recipe: Recipe, size: int) -> ImageTransform:
    """The recipe's evaluation protocol at `size` (from `evaluation_size`): the resize and
    centre crop of `evaluate.crop_ratio`. Validation during training and the test use this one
    function, so the epoch chosen as best is chosen by what the test measures."""
    return build_transform(recipe.augment, size, train=False, crop_ratio=recipe.evaluate.crop_ratio)


def decode_sample(sample: dict[str, Any]) -> tuple[torch.Tensor, int, dict]:
    key = next(k for k in IMAGE_KEYS if k in sample)
    data = torch.frombuffer(bytearray(sample[key]), dtype=torch.uint8)
    if key == "jpg":
        image = decode_jpeg(data, mode=ImageReadMode.RGB)
    else:
        image = decode_image(data, mode=ImageReadMode.RGB)
    meta = json.loads(sample["json"])
    return image, int(sample["cls"]), meta
