"""Pieces shared by every model family: the uniform attention API, CAMs and initialisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionMaps = dict[str, Tensor]


class AttentionAPI:
    """Mixin giving every registry model the same forward/attention interface.

    Subclasses implement ``_features(x, maps)``: the feature extractor, which writes its attention
    maps into ``maps`` when it is a dict and skips that work when it is ``None``. Passing the dict
    down the call (instead of caching maps on modules) keeps forward passes free of shared state,
    so concurrent calls and ``torch.compile`` see a pure function.
    """

    def _features(self, x: Tensor, maps: AttentionMaps | None) -> Tensor:
        raise NotImplementedError

    def forward_head(self, feats: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> Tensor:
        """Backbone output that ``forward_head`` turns into logits."""
        return self._features(x, None)

    def forward(self, x: Tensor) -> Tensor:
        """Logits, N x num_classes."""
        return self.forward_head(self._features(x, None))

    def forward_with_attention(self, x: Tensor) -> tuple[Tensor, AttentionMaps]:
        """Logits and the named attention maps from one pass (no second forward for overlays)."""
        maps: AttentionMaps = {}
        feats = self._features(x, maps)
        logits = self.forward_head(feats)
        self._head_maps(feats, logits, maps)
        return logits, maps

    def _head_maps(self, feats: Tensor, logits: Tensor, maps: AttentionMaps) -> None:
        """Add maps that need the pass's logits (e.g. a class activation map); none by default."""

    def attention_maps(self, x: Tensor) -> AttentionMaps:
        """Named attention maps for input ``x``; the model's docstring gives keys and shapes.

        Runs under the caller's grad mode: wrap in ``torch.no_grad()`` for visualisation.
        """
        return self.forward_with_attention(x)[1]


def _interpolate(x: Tensor, size: Sequence[int], align_corners: bool) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


# torch 2.13's Inductor CPU (C++) backend can miscompile the backward of a bilinear upsample fused
# with neighbouring ops (local-buffer promotion of index_put's mutation output in outer-loop
# fusion, pytorch/pytorch#196570, fix in PR #196639): training then crashes with
# UnboundLocalError or silently gets wrong gradients (seen with the Residual Attention mask).
_interpolate_eager = torch.compiler.disable(_interpolate)


def upsample_bilinear(x: Tensor, size: Sequence[int], align_corners: bool) -> Tensor:
    """Bilinear resize of ``x`` (N x C x h x w) to ``size``.

    Under ``torch.compile`` on CPU it runs eagerly (one graph break per call) to avoid the
    Inductor bug above; eager mode, GPU compilation and ``torch.export`` / ONNX are unaffected.
    """
    compiling = torch.compiler.is_compiling() and not torch.compiler.is_exporting()
    if compiling and x.device.type == "cpu":
        return _interpolate_eager(x, size, align_corners)
    return _interpolate(x, size, align_corners)


def init_conv_bn(module: nn.Module) -> None:
    """He-normal convs (fan-out, as torchvision) and unit/zero BatchNorm affine parameters."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def class_activation_map(head: nn.Module, feats: Tensor, classes: Tensor) -> Tensor:
    """Score of class ``classes[n]`` at every position of ``feats``: N x 1 x h x w.

    ``head`` maps pooled N x C features to logits. An ``nn.Linear`` head gives exactly
    ``W[k] . feats[n, :, i, j] + b[k]`` (only the needed class rows are computed); any other
    head is applied to each position's C-vector (for a head that is affine in eval mode, such
    as the streamlined MLP, that is the same map). For an affine head the map's spatial mean is
    the logit of the average-pooled features.
    """
    n, c, h, w = feats.shape
    if isinstance(head, nn.Linear):
        cam = torch.einsum("nc,nchw->nhw", head.weight[classes], feats)
        if head.bias is not None:
            cam = cam + head.bias[classes][:, None, None]
        return cam[:, None]
    per_position = feats.permute(0, 2, 3, 1).reshape(n * h * w, c)
    scores = head(per_position).view(n, h * w, -1)  # N x hw x K
    picked = scores.gather(2, classes.view(n, 1, 1).expand(n, h * w, 1))
    return picked.view(n, 1, h, w)
