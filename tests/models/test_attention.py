"""Attention-map extraction beside the models: spatial_maps and spatial_attention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnpipe.models import create_model, spatial_attention, spatial_maps


def test_spatial_maps_keeps_layouts_and_drops_channel_weights() -> None:
    maps = {
        "mask": torch.rand(2, 1, 8, 8, requires_grad=True),
        "plain": torch.rand(2, 5, 6, dtype=torch.float64),
        "channels": torch.rand(2, 64),  # N x C channel weights: nothing to draw
        "point": torch.rand(2, 1, 1, 1),  # a 1 x 1 map has no layout either
        "multi": torch.rand(2, 3, 8, 8),  # several channels: not one map per image
    }
    kept = spatial_maps(maps)
    assert list(kept) == ["mask", "plain"]
    assert kept["mask"].shape == (2, 8, 8) and kept["plain"].shape == (2, 5, 6)
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in kept.values())
    torch.testing.assert_close(kept["mask"], maps["mask"][:, 0].detach())


@pytest.mark.parametrize("training", [True, False])
def test_spatial_attention_runs_eval_no_grad_and_restores_mode(training: bool) -> None:
    torch.manual_seed(0)
    model = create_model("streamlined_resnet18", 3).train(training)
    images = torch.randn(2, 3, 64, 64)
    seen: dict[str, bool] = {}

    def probe(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        seen.update(training=module.training, grad=torch.is_grad_enabled())

    model.conv1.register_forward_hook(probe)
    maps = spatial_attention(model, images)
    assert seen == {"training": False, "grad": False}
    assert model.training is training
    assert all(m.training is training for m in model.modules())
    assert list(maps) == ["cam"]  # the channel weights of the blocks are left out
    assert maps["cam"].shape == (2, 2, 2) and maps["cam"].device.type == "cpu"
    with torch.no_grad():
        expected = model.eval().attention_maps(images)["cam"][:, 0]
    torch.testing.assert_close(maps["cam"], expected)


def test_spatial_attention_restores_mode_when_the_pass_fails() -> None:
    model = create_model("attention56_cifar", 3, width_multiplier=0.25).train()
    with pytest.raises(RuntimeError):
        spatial_attention(model, torch.randn(1, 1, 32, 32))  # wrong channel count
    assert model.training
