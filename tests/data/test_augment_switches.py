"""Augmentation switches in recipes and in the loaders' per-image transform (uint8, workers).

Off by default: the per-image pipeline of every existing recipe is the one it was before the
switches existed, image for image and random number for random number.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from attnpipe.config import (
    AugmentConfig,
    ConfigError,
    available_pipelines,
    load_recipe,
    parse_recipe,
)
from attnpipe.data.batch_augment import BatchAugment
from attnpipe.data.transforms import _RandomFlip, _RandomResizedCrop, build_transform
from tests.conftest import REPO

SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # resizes are small: one thread is faster on a busy machine
    yield
    torch.set_num_threads(previous)


def _images() -> list[torch.Tensor]:
    """A few uint8 CHW images: a gradient with noise (not spanning 0-255, so that contrast
    operations have work to do), of different sizes, one of them channels-last as decoded."""
    rng = np.random.default_rng(0)
    images = []
    for height, width in ((40, 48), (36, 36), (64, 40), (33, 50)):
        ramp = (
            np.linspace(40, 200, width)[None, None, :] + np.linspace(0, 20, height)[None, :, None]
        )
        noisy = ramp + rng.normal(0, 12, (3, height, width))
        images.append(torch.from_numpy(noisy.clip(0, 255).astype(np.uint8)))
    images[0] = images[0].unsqueeze(0).contiguous(memory_format=torch.channels_last)[0]
    return images


def _todays_augment(augment: AugmentConfig) -> v2.Compose:
    """The per-image training pipeline as `build_transform` built it before the switches."""
    steps = [
        _RandomResizedCrop(
            SIZE, augment.random_resized_crop_scale, augment.random_resized_crop_ratio
        )
    ]
    if augment.horizontal_flip:
        steps.append(_RandomFlip(augment.horizontal_flip, dim=-1))
    if augment.vertical_flip:
        steps.append(_RandomFlip(augment.vertical_flip, dim=-2))
    if augment.rotation_degrees:
        steps.append(v2.RandomRotation(augment.rotation_degrees))
    if augment.color_jitter:
        steps.append(v2.ColorJitter(*[augment.color_jitter] * 3))
    return v2.Compose(steps)


def _run(
    transform, images: list[torch.Tensor], seed: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Outputs from `seed`, and the generator's state afterwards (what was drawn)."""
    torch.manual_seed(seed)
    outputs = [transform(image) for image in images]
    return outputs, torch.get_rng_state()


# --------------------------------------------------------------------------- recipes
def test_new_keys_default_to_off():
    augment = AugmentConfig()
    assert augment.auto_augment == "none"
    assert augment.random_erasing == 0.0
    assert augment.mixup_alpha == 0.0 and augment.cutmix_alpha == 0.0
    assert augment.mix_prob == 1.0
    assert (augment.randaugment_num_ops, augment.randaugment_magnitude) == (2, 9)


@pytest.mark.parametrize("name", available_pipelines(REPO))
def test_shipped_recipes_leave_every_new_switch_off(name):
    augment = load_recipe(name, REPO).augment
    assert augment.auto_augment == "none"
    assert not BatchAugment(augment, num_classes=10).enabled


@pytest.mark.parametrize(
    ("augment", "message"),
    [
        ({"mixup": 0.2}, "unknown key 'augment.mixup' (valid keys: auto_augment, color_jitter"),
        ({"auto_augment": "autoaugment"}, "'augment.auto_augment': Input should be 'none'"),
        ({"mix_prob": 1.5}, "'augment.mix_prob': Input should be less than or equal to 1"),
        ({"cutmix_alpha": -1}, "'augment.cutmix_alpha': Input should be greater than or equal"),
        ({"randaugment_magnitude": 31}, "'augment.randaugment_magnitude': Input should be less"),
    ],
)
def test_bad_augment_keys_are_one_line_errors(augment, message):
    data = {"source": {"kind": "sklearn-digits"}, "model": {"name": "attention56_cifar"}}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        parse_recipe({**data, "augment": augment}, name="digits")
    assert "\n" not in str(info.value)


def test_switches_are_recipe_keys():
    data = {
        "source": {"kind": "sklearn-digits"},
        "model": {"name": "attention56_cifar"},
        "augment": {
            "auto_augment": "randaugment",
            "randaugment_num_ops": 3,
            "randaugment_magnitude": 12,
            "random_erasing": 0.25,
            "mixup_alpha": 0.2,
            "cutmix_alpha": 1.0,
            "mix_prob": 0.8,
        },
    }
    augment = parse_recipe(data, name="digits").augment
    assert augment.auto_augment == "randaugment" and augment.randaugment_num_ops == 3
    assert (augment.random_erasing, augment.mixup_alpha, augment.cutmix_alpha) == (0.25, 0.2, 1.0)


# --------------------------------------------------------------------------- off = today
@pytest.mark.parametrize(
    "augment",
    [
        AugmentConfig(),
        AugmentConfig(  # the digits recipe's
            random_resized_crop_scale=(0.75, 1.0),
            random_resized_crop_ratio=(0.9, 1.1),
            horizontal_flip=0.0,
            rotation_degrees=10,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
        AugmentConfig(vertical_flip=0.5, color_jitter=0.2),
    ],
    ids=["defaults", "digits", "flips-jitter"],
)
def test_switches_off_give_todays_transform_bit_for_bit(augment):
    images = _images()
    ours = build_transform(augment, SIZE, train=True)
    for seed in (0, 1, 2):
        expected, expected_rng = _run(_todays_augment(augment), images, seed)
        got, got_rng = _run(ours.augment, images, seed)
        for a, b in zip(got, expected, strict=True):
            assert a.dtype == torch.uint8 and torch.equal(a, b)
        assert torch.equal(got_rng, expected_rng)  # no extra random numbers drawn


# --------------------------------------------------------------------------- on
@pytest.mark.parametrize(
    ("augment", "policy"),
    [
        (AugmentConfig(auto_augment="randaugment"), v2.RandAugment(num_ops=2, magnitude=9)),
        (
            AugmentConfig(
                auto_augment="randaugment", randaugment_num_ops=3, randaugment_magnitude=15
            ),
            v2.RandAugment(num_ops=3, magnitude=15),
        ),
        (AugmentConfig(auto_augment="trivialaugment"), v2.TrivialAugmentWide()),
    ],
    ids=["randaugment", "randaugment-3-15", "trivialaugment"],
)
def test_auto_augment_is_torchvisions_policy_after_crop_and_flip(augment, policy):
    images = _images()
    ours = build_transform(augment, SIZE, train=True)
    reference = v2.Compose([_todays_augment(augment), policy])
    plain = _todays_augment(AugmentConfig())
    changed = 0
    for seed in (0, 1):
        got, _ = _run(ours.augment, images, seed)
        expected, _ = _run(reference, images, seed)
        again, _ = _run(ours.augment, images, seed)
        unaugmented, _ = _run(plain, images, seed)  # the same crops and flips, no policy
        for a, b, c, d in zip(got, expected, again, unaugmented, strict=True):
            assert a.shape == (3, SIZE, SIZE) and a.dtype == torch.uint8  # in the worker
            assert torch.equal(a, b)  # torchvision's policy with the recipe's parameters
            assert torch.equal(a, c)  # deterministic under a seed
            changed += not torch.equal(a, d)
    # A policy can draw the identity (or strength 0) for an image now and then: most change.
    assert changed >= 6
    torch.manual_seed(0)
    normalised = ours(images[1])
    assert normalised.shape == (3, SIZE, SIZE) and normalised.dtype == torch.float32


def test_evaluation_never_augments():
    images = _images()
    augment = AugmentConfig(auto_augment="trivialaugment", random_erasing=1.0, mixup_alpha=1.0)
    evaluation = build_transform(augment, SIZE, train=False)
    plain = build_transform(AugmentConfig(), SIZE, train=False)
    for seed in (0, 1):
        got, got_rng = _run(evaluation, images, seed)
        expected, expected_rng = _run(plain, images, seed)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        assert torch.equal(got_rng, expected_rng)
