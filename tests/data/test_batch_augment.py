"""Batch augmentation after normalisation: random erasing per image, MixUp, CutMix."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from attnpipe.config import AugmentConfig
from attnpipe.data.batch_augment import BatchAugment

CLASSES = 7
LABELS = torch.tensor([0, 3, 5, 6, 2, 1])  # all different: a mixed row names both sources


def _batch(seed: int = 0) -> torch.Tensor:
    """Normalised-looking float images; no two pixels equal, so origins can be told apart."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(len(LABELS), 3, 12, 16, generator=generator)


def _call(augment: BatchAugment, images: torch.Tensor, seed: int):
    torch.manual_seed(seed)
    return augment(images, LABELS)


# --------------------------------------------------------------------------- off
def test_off_by_default_is_the_identity_and_draws_nothing():
    augment = BatchAugment(AugmentConfig(), CLASSES)
    assert not augment.enabled and not augment.mixing
    images = _batch()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    got_images, got_labels = augment(images, LABELS)
    assert got_images is images and got_labels is LABELS  # untouched: not even copied
    assert torch.equal(torch.get_rng_state(), before)  # no random numbers consumed


# --------------------------------------------------------------------------- MixUp
def test_mixup_blends_each_image_with_its_predecessor_and_its_target():
    augment = BatchAugment(AugmentConfig(mixup_alpha=0.4), CLASSES)
    images = _batch()
    original = images.clone()
    for seed in range(3):
        mixed, targets = _call(augment, images, seed)
        assert mixed.shape == images.shape and mixed.dtype == torch.float32
        assert targets.shape == (len(LABELS), CLASSES) and targets.dtype == torch.float32
        torch.testing.assert_close(targets.sum(1), torch.ones(len(LABELS)))
        lam = float(targets[0, LABELS[0]])
        assert 0 < lam < 1
        previous = LABELS.roll(1)
        expected = torch.zeros(len(LABELS), CLASSES)
        expected[torch.arange(len(LABELS)), LABELS] = lam
        expected[torch.arange(len(LABELS)), previous] = 1 - lam
        torch.testing.assert_close(targets, expected)
        # The pixels carry the same weight as the target: lam of the image, 1 - lam of the
        # one before it in the batch.
        torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.roll(1, 0))
        again, again_targets = _call(augment, images, seed)
        assert torch.equal(again, mixed) and torch.equal(again_targets, targets)
    assert torch.equal(images, original)  # the input batch is left as it was


# --------------------------------------------------------------------------- CutMix
def test_cutmix_pastes_a_box_and_weights_targets_by_its_area():
    augment = BatchAugment(AugmentConfig(cutmix_alpha=1.0), CLASSES)
    images = _batch()
    partial = 0
    for seed in range(6):
        mixed, targets = _call(augment, images, seed)
        assert mixed.shape == images.shape and mixed.dtype == torch.float32
        torch.testing.assert_close(targets.sum(1), torch.ones(len(LABELS)))
        pasted = (mixed != images).any(dim=1)  # (N, H, W): pixels that came from elsewhere
        assert torch.equal(mixed[:, :, ~pasted[0]], images[:, :, ~pasted[0]])
        assert torch.equal(
            mixed.permute(1, 0, 2, 3)[:, pasted], images.roll(1, 0).permute(1, 0, 2, 3)[:, pasted]
        )  # ... from the previous image, same place
        area = pasted.float().mean(dim=(1, 2))  # one box for the batch: the same share
        assert torch.equal(area, area[:1].expand_as(area))
        rows = torch.arange(len(LABELS))
        torch.testing.assert_close(targets[rows, LABELS.roll(1)], area)
        torch.testing.assert_close(targets[rows, LABELS], 1 - area)
        partial += bool(0 < area[0] < 1)
    assert partial >= 3  # boxes of some size, not only the empty or whole image


# --------------------------------------------------------------------------- both, mix_prob
def _kind(mixed: torch.Tensor, images: torch.Tensor) -> str:
    if torch.equal(mixed, images):
        return "none"
    return "cutmix" if (mixed == images).any() else "mixup"


def test_both_on_pick_one_per_batch_at_random():
    augment = BatchAugment(AugmentConfig(mixup_alpha=0.4, cutmix_alpha=1.0), CLASSES)
    images = _batch()
    kinds = [_kind(_call(augment, images, seed)[0], images) for seed in range(16)]
    assert set(kinds) == {"mixup", "cutmix"}
    assert kinds == [_kind(_call(augment, images, seed)[0], images) for seed in range(16)]


def test_mix_prob_leaves_some_batches_unmixed_with_one_hot_targets():
    images = _batch()
    never = BatchAugment(AugmentConfig(mixup_alpha=0.4, mix_prob=0.0), CLASSES)
    same, targets = _call(never, images, 0)
    assert torch.equal(same, images)
    assert torch.equal(targets, torch.nn.functional.one_hot(LABELS, CLASSES).float())
    half = BatchAugment(AugmentConfig(mixup_alpha=0.4, mix_prob=0.5), CLASSES)
    outcomes = [_call(half, images, seed) for seed in range(16)]
    kinds = {_kind(mixed, images) for mixed, _ in outcomes}
    assert kinds == {"none", "mixup"}
    assert all(t.shape == (len(LABELS), CLASSES) and t.dtype == torch.float32 for _, t in outcomes)


# --------------------------------------------------------------------------- random erasing
def test_random_erasing_blanks_one_box_per_image_as_torchvision_would():
    augment = BatchAugment(AugmentConfig(random_erasing=1.0), CLASSES)
    assert augment.enabled and not augment.mixing
    images = _batch()
    original = images.clone()
    reference = v2.RandomErasing(p=1.0, value=0.0)  # torchvision's, one image at a time
    for seed in range(3):
        erased, labels = _call(augment, images, seed)
        assert labels is LABELS  # no mixing: integer labels as they came
        assert erased.shape == images.shape and erased.dtype == torch.float32
        torch.manual_seed(seed)
        expected = torch.stack([reference(image) for image in images])
        assert torch.equal(erased, expected)
        blank = erased.eq(0).all(dim=1)  # (N, H, W): erased in every channel
        assert blank.any(dim=(1, 2)).all()  # every image lost a box ...
        assert torch.equal(erased[~blank.unsqueeze(1).expand_as(erased)],
                           images[~blank.unsqueeze(1).expand_as(images)])  # fmt: skip
        boxes = {tuple(b.nonzero().min(0).values.tolist() + b.nonzero().max(0).values.tolist())
                 for b in blank}  # fmt: skip
        assert len(boxes) > 1  # ... each its own
        assert torch.equal(_call(augment, images, seed)[0], erased)  # deterministic
    assert torch.equal(images, original)


def test_random_erasing_probability_is_per_image():
    augment = BatchAugment(AugmentConfig(random_erasing=0.5), CLASSES)
    images = _batch()
    counts = set()
    for seed in range(4):
        erased, _ = _call(augment, images, seed)
        counts.add(int(erased.eq(0).all(dim=1).any(dim=(1, 2)).sum()))
    assert counts - {0, len(LABELS)}  # some batches partly erased


def test_erasing_then_mixing_keeps_channels_last():
    augment = BatchAugment(
        AugmentConfig(random_erasing=0.5, mixup_alpha=0.4, cutmix_alpha=1.0), CLASSES
    )
    images = _batch().contiguous(memory_format=torch.channels_last)
    for seed in range(4):
        mixed, targets = _call(augment, images, seed)
        assert mixed.is_contiguous(memory_format=torch.channels_last)
        assert targets.shape == (len(LABELS), CLASSES)


def test_a_batch_of_the_wrong_shape_is_a_clear_error():
    augment = BatchAugment(AugmentConfig(mixup_alpha=0.4), CLASSES)
    with pytest.raises(ValueError, match=r"images \(N, C, H, W\) and labels \(N,\)"):
        augment(_batch()[0], LABELS)
