"""Extracting the attention maps that can be drawn on an image.

Models return maps of two kinds (``attention_maps`` / ``forward_with_attention``): spatial maps
(N x 1 x h x w: Residual Attention masks, grid and LTPA attention, class activation maps) and
channel weights (N x C: squeeze-and-excitation and streamlined blocks), which have no layout
to overlay. These helpers keep the spatial ones.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["spatial_attention", "spatial_maps"]


def spatial_maps(maps: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The maps with a spatial layout (N x 1 x h x w or N x h x w), as N x h x w float on CPU.

    Channel weights (N x C) and degenerate maps (a side of 1) are left out; order is kept.
    """
    kept = {}
    for name, value in maps.items():
        if value.ndim == 4 and value.shape[1] == 1:
            value = value[:, 0]
        if value.ndim == 3 and min(value.shape[-2:]) > 1:
            kept[name] = value.detach().float().cpu()
    return kept


def spatial_attention(model: nn.Module, images: Tensor) -> dict[str, Tensor]:
    """Spatial attention maps of ``images`` (N x 3 x H x W) from one eval-mode, no-grad pass.

    ``model`` is a registry model (it has ``attention_maps``). The images are moved to the
    model's device; the maps come back on CPU as N x h x w float. The model's train/eval mode
    is restored afterwards, also when the pass raises.
    """
    param = next(model.parameters(), None)
    if param is not None:
        images = images.to(param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            maps = model.attention_maps(images)
    finally:
        model.train(was_training)
    return spatial_maps(maps)
