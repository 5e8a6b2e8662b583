"""Learn To Pay Attention (Jetley et al., ICLR 2018): (VGG-att3)-concat, after the official
Lua code. Shapes in comments are for 32 x 32 input.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ._common import AttentionAPI, AttentionMaps, init_conv_bn

__all__ = ["LTPAVGG", "LTPAttention", "ltpa_vgg_cifar"]

Compatibility = Literal["pc", "dp"]


def _conv_bn_relu(in_ch: int, out_ch: int, dropout: float = 0.0) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_ch, eps=1e-3),
        nn.ReLU(inplace=True),
    ]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return layers


def _vgg_block(spec: list[tuple[int, int, float]]) -> nn.Sequential:
    return nn.Sequential(*(m for in_ch, out_ch, p in spec for m in _conv_bn_relu(in_ch, out_ch, p)))


class LTPAttention(nn.Module):
    """Softmax attention over the positions of ``local`` with compatibility to the global ``g``.

    ``pc``: c = <u, local + g> (a 1x1 conv to one channel); ``dp``: c = <local, g>.
    Note that in ``pc`` the term <u, g> is the same at every position, so it cancels in the
    softmax: as in the official code, g then does not steer the attention (its branch gets zero
    gradient); ``dp`` is the variant where it does. For the same reason the pc conv has no bias.
    """

    def __init__(self, channels: int, compatibility: Compatibility) -> None:
        super().__init__()
        self.compatibility = compatibility
        self.score = (
            nn.Conv2d(channels, 1, kernel_size=1, bias=False) if compatibility == "pc" else None
        )

    def forward(self, local: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """``local``: N x C x H x W, ``g``: N x C. Returns (a N x 1 x H x W, context N x C)."""
        # Scores in float32 even under autocast: the softmax exponentiates them, so bf16
        # rounding of scores in the tens would become percent-level attention errors.
        with torch.autocast(local.device.type, enabled=False):
            l32, g32 = local.float(), g.float()[:, :, None, None]
            c = self.score(l32 + g32) if self.score is not None else (l32 * g32).sum(1, True)
        a = torch.softmax(c.flatten(2), dim=2).view_as(c)  # N x 1 x H x W, sums to 1
        return a, (a * local).sum(dim=(2, 3))


class LTPAVGG(AttentionAPI, nn.Module):
    """CIFAR VGG-16 (BN + dropout) without its first two max-pools, with three attention levels.

    ``attention_maps(x)``: ``"attn1"`` N x 1 x H x W, ``"attn2"`` N x 1 x H/2 x W/2, ``"attn3"``
    N x 1 x H/4 x W/4, each a softmax over positions (sums to 1). ``forward_features`` returns the
    concatenated context vectors (256 | 512 | 512 = 1280); ``forward_head`` applies
    BN-ReLU-dropout and the linear classifier.
    """

    def __init__(
        self, num_classes: int, compatibility: Compatibility = "pc", dropout: float = 0.5
    ) -> None:
        super().__init__()
        if compatibility not in ("pc", "dp"):
            raise ValueError(f"compatibility must be 'pc' or 'dp', got {compatibility!r}")
        # Conv dropout rates of the CIFAR VGG the paper builds on (vgg_bn_drop.lua).
        self.local1 = _vgg_block(
            [
                *[(3, 64, 0.3), (64, 64, 0), (64, 128, 0.4), (128, 128, 0)],
                *[(128, 256, 0.4), (256, 256, 0.4), (256, 256, 0)],
            ]
        )  # l1: N x 256 x 32 x 32
        self.pool = nn.MaxPool2d(2, 2)  # parameter-free, shared on purpose
        self.local2 = _vgg_block([(256, 512, 0.4), (512, 512, 0.4), (512, 512, 0)])  # 512@16
        self.local3 = _vgg_block([(512, 512, 0.4), (512, 512, 0.4), (512, 512, 0)])  # 512@8
        self.global_conv = nn.Sequential(
            nn.MaxPool2d(2, 2),  # 512 x 4 x 4
            *_conv_bn_relu(512, 512, 0.4),
            nn.MaxPool2d(2, 2),  # 512 x 2 x 2
            *_conv_bn_relu(512, 512, 0.4),
            nn.AdaptiveMaxPool2d(1),  # 512 x 1 x 1 (a 2x2 max-pool at 32 input)
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.Linear(512, 512),  # g: N x 512
        )
        # l1 has 256 channels: g is projected down to it (BN-ReLU-dropout-linear, as in Lua).
        self.project1 = nn.Sequential(
            nn.BatchNorm1d(512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, 256)
        )
        self.attn1 = LTPAttention(256, compatibility)
        self.attn2 = LTPAttention(512, compatibility)
        self.attn3 = LTPAttention(512, compatibility)
        self.num_features = 256 + 512 + 512
        # Per-level BN-ReLU-dropout of the concat head; BN is per feature, so one BN over the
        # concatenation is exactly the three separate ones.
        self.head = nn.Sequential(nn.BatchNorm1d(self.num_features), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(self.num_features, num_classes)
        init_conv_bn(self)

    def _features(self, x: Tensor, maps: AttentionMaps | None) -> Tensor:
        l1 = self.local1(x)  # N x 256 x 32 x 32
        l2 = self.local2(self.pool(l1))  # N x 512 x 16 x 16
        l3 = self.local3(self.pool(l2))  # N x 512 x 8 x 8
        g = self.global_conv(l3)  # N x 512
        a1, c1 = self.attn1(l1, self.project1(g))
        a2, c2 = self.attn2(l2, g)
        a3, c3 = self.attn3(l3, g)
        if maps is not None:
            maps.update(attn1=a1, attn2=a2, attn3=a3)
        return torch.cat((c1, c2, c3), dim=1)  # N x 1280

    def forward_head(self, feats: Tensor) -> Tensor:
        return self.classifier(self.head(feats))


def ltpa_vgg_cifar(
    num_classes: int = 100, compatibility: Compatibility = "pc", dropout: float = 0.5
) -> LTPAVGG:
    """(VGG-att3)-concat-``compatibility`` for 32 x 32 inputs (other multiples of 8 also run)."""
    return LTPAVGG(num_classes, compatibility=compatibility, dropout=dropout)
