"""AttnVGG for melanoma recognition (Yan et al., IPMI 2019: "Melanoma Recognition via Visual
Attention"): torchvision vgg16_bn features with grid attention on pool-3 and pool-4, guided by
pool-5. Shapes in comments are for 224 x 224 input.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.vgg import cfgs, make_layers

from ._common import AttentionAPI, AttentionMaps, init_conv_bn, upsample_bilinear
from .pretrained import load_backbone

__all__ = ["AttnVGG", "GridAttention", "attnvgg16"]

Normalize = Literal["sigmoid", "softmax"]

# Indices of the max-pool layers in torchvision's vgg16_bn ``features`` whose outputs we tap.
_POOL3, _POOL4, _POOL5 = 23, 33, 43


class GridAttention(nn.Module):
    """Additive attention of local features ``local`` guided by a coarser global map ``g``.

    ``c = phi(relu(W_l local + up(W_g g)))``; ``sigmoid``: a = sigmoid(c), output = mean of
    a * local over positions; ``softmax``: a = softmax of c over positions, output = sum.
    """

    def __init__(self, local_ch: int, global_ch: int, attn_ch: int, normalize: Normalize) -> None:
        super().__init__()
        self.normalize = normalize
        self.w_l = nn.Conv2d(local_ch, attn_ch, kernel_size=1, bias=False)
        self.w_g = nn.Conv2d(global_ch, attn_ch, kernel_size=1, bias=False)
        self.phi = nn.Conv2d(attn_ch, 1, kernel_size=1, bias=True)

    def forward(self, local: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (attention N x 1 x H x W, attended descriptor N x C)."""
        # N x 256 x H x W; align_corners=False as in the original code
        g_up = upsample_bilinear(self.w_g(g), local.shape[-2:], align_corners=False)
        hidden = F.relu(self.w_l(local) + g_up)
        # Scores in float32 even under autocast (cheap: one output channel), since the softmax
        # variant exponentiates them.
        with torch.autocast(local.device.type, enabled=False):
            c = self.phi(hidden.float())  # N x 1 x H x W
        if self.normalize == "softmax":
            a = torch.softmax(c.flatten(2), dim=2).view_as(c)
            return a, (a * local).sum(dim=(2, 3))
        a = torch.sigmoid(c)
        return a, (a * local).mean(dim=(2, 3))


class AttnVGG(AttentionAPI, nn.Module):
    """VGG-16-BN with two grid-attention blocks.

    ``attention_maps(x)``: ``"attn1"`` on pool-3 (N x 1 x H/8 x W/8) and ``"attn2"`` on pool-4
    (N x 1 x H/16 x W/16); in [0, 1] for ``sigmoid``, summing to 1 over positions for ``softmax``.
    ``forward_features`` returns the 1280-d descriptor (GAP(pool5) 512 | attended pool-3 256 |
    attended pool-4 512); ``forward_head`` is dropout + linear.

    Initialisation as the original (SaoYan/IPMI2019-AttnMel, ``networks.AttnVGG``, its
    ``reset_parameters`` applied to ``attn1``, ``attn2`` and ``cls``): every attention conv
    (``w_l``, ``w_g``, ``phi``) He-normal with fan-in (std sqrt(2 / fan_in)), the one conv bias
    (``phi``) zero; the classifier N(0, 0.01) with zero bias. The VGG features, which the
    original always takes ImageNet-pretrained, get torchvision's VGG init (He-normal, fan-out)
    when trained from scratch.
    """

    def __init__(
        self, num_classes: int, normalize: Normalize = "sigmoid", dropout: float = 0.0
    ) -> None:
        super().__init__()
        if normalize not in ("sigmoid", "softmax"):
            raise ValueError(f"normalize must be 'sigmoid' or 'softmax', got {normalize!r}")
        # Same module tree as torchvision's vgg16_bn().features, so its weights load by key.
        self.features = make_layers(cfgs["D"], batch_norm=True)
        self.attn1 = GridAttention(256, 512, 256, normalize)
        self.attn2 = GridAttention(512, 512, 256, normalize)
        self.dropout = nn.Dropout(dropout)
        self.num_features = 512 + 256 + 512
        self.classifier = nn.Linear(self.num_features, num_classes)
        init_conv_bn(self.features)
        self._init_like_original()

    def _init_like_original(self) -> None:
        for m in (*self.attn1.modules(), *self.attn2.modules()):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def _features(self, x: Tensor, maps: AttentionMaps | None) -> Tensor:
        taps: list[Tensor] = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in (_POOL3, _POOL4):
                taps.append(x)
        pool3, pool4, pool5 = *taps, x  # 256 x 28 x 28, 512 x 14 x 14, 512 x 7 x 7
        a1, g1 = self.attn1(pool3, pool5)  # N x 1 x 28 x 28, N x 256
        a2, g2 = self.attn2(pool4, pool5)  # N x 1 x 14 x 14, N x 512
        if maps is not None:
            maps["attn1"] = a1
            maps["attn2"] = a2
        g = pool5.mean(dim=(2, 3))  # adaptive global pooling: any input size, N x 512
        return torch.cat((g, g1, g2), dim=1)  # N x 1280

    def forward_head(self, feats: Tensor) -> Tensor:
        return self.classifier(self.dropout(feats))

    def load_backbone(
        self, source: str | Path | Mapping[str, Tensor], origin: str | None = None
    ) -> None:
        """Load a torchvision ``vgg16_bn`` state_dict (its classifier is ignored)."""
        load_backbone(
            self,
            source,
            origin=origin,
            backbone=lambda k: k.startswith("features."),
            ignore=lambda k: k.startswith("classifier."),
        )


def attnvgg16(
    num_classes: int = 2, normalize: Normalize = "sigmoid", dropout: float = 0.0
) -> AttnVGG:
    """AttnVGG-16 (15,182,402 + 1,281 x num_classes parameters)."""
    return AttnVGG(num_classes, normalize=normalize, dropout=dropout)
