"""ResNets on torchvision's building blocks: the plain baseline and the streamlined
channel-attention variant. Shapes in comments are for 224 x 224 input (ResNet-50).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ._common import AttentionAPI, AttentionMaps, load_backbone

__all__ = [
    "ChannelAttention",
    "ResNetBaseline",
    "StreamlinedBasicBlock",
    "StreamlinedBottleneck",
    "StreamlinedResNet",
    "resnet50",
    "streamlined_resnet18",
    "streamlined_resnet50",
]


class ChannelAttention(nn.Module):
    """GAP -> FC(C -> C/r) -> ReLU -> FC(C/r -> C) -> sigmoid; both FCs with bias."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Linear(channels, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        """Channel weights N x C in [0, 1] for feature map ``x`` (N x C x H x W)."""
        return torch.sigmoid(self.fc2(self.relu(self.fc1(x.mean(dim=(2, 3))))))


def _attended_residual(
    block: BasicBlock | Bottleneck, x: Tensor, out: Tensor, maps: AttentionMaps | None, key: str
) -> Tensor:
    # Shared tail of both blocks: reweight the residual branch, then skip-add and ReLU.
    w = block.attn(out)  # N x C
    if maps is not None:
        maps[key] = w
    out = out * w[:, :, None, None]
    identity = x if block.downsample is None else block.downsample(x)
    return block.relu(out + identity)


class StreamlinedBottleneck(Bottleneck):
    """torchvision Bottleneck with channel attention on the residual branch before the add."""

    def __init__(self, *args, reduction: int = 16, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attn = ChannelAttention(self.conv3.out_channels, reduction)

    def forward(self, x: Tensor, maps: AttentionMaps | None = None, key: str = "") -> Tensor:
        """Block output; with ``maps``, also stores the channel weights under ``key``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))  # N x 4*planes x H x W
        return _attended_residual(self, x, out, maps, key)


class StreamlinedBasicBlock(BasicBlock):
    """torchvision BasicBlock with channel attention on the residual branch before the add."""

    def __init__(self, *args, reduction: int = 16, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attn = ChannelAttention(self.conv2.out_channels, reduction)

    def forward(self, x: Tensor, maps: AttentionMaps | None = None, key: str = "") -> Tensor:
        """Block output; with ``maps``, also stores the channel weights under ``key``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))  # N x planes x H x W
        return _attended_residual(self, x, out, maps, key)


_LAYERS = ("layer1", "layer2", "layer3", "layer4")


class _ResNetAPI(AttentionAPI, ResNet):
    """torchvision ResNet with the registry's forward_features / forward_head split.

    Parameter names are torchvision's, so torchvision state_dicts load by key.
    """

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))  # N x 64 x 56 x 56

    def forward_head(self, feats: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(feats), 1))  # N x num_classes

    def load_backbone(self, path: str | Path) -> None:
        """Load a torchvision ResNet state_dict of the same depth (its ``fc`` is ignored)."""
        load_backbone(
            self,
            path,
            backbone=lambda k: not k.startswith("fc.") and ".attn." not in k,
            ignore=lambda k: k.startswith("fc."),
        )


class ResNetBaseline(_ResNetAPI):
    """Plain torchvision ResNet; ``attention_maps`` returns an empty dict."""

    def _features(self, x: Tensor, maps: AttentionMaps | None) -> Tensor:
        x = self._stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))  # N x 2048 x 7 x 7


class StreamlinedResNet(_ResNetAPI):
    """ResNet whose every block reweights its residual branch with channel attention.

    ``attention_maps(x)``: one entry per block, keys ``"layer{k}.{i}"``, channel weights N x C
    in [0, 1] (C = the block's output channels).
    """

    def _features(self, x: Tensor, maps: AttentionMaps | None) -> Tensor:
        x = self._stem(x)
        for name in _LAYERS:
            for i, block in enumerate(getattr(self, name)):
                x = block(x, maps, f"{name}.{i}")
        return x  # N x 2048 x 7 x 7 (ResNet-50)


def _streamlined(
    block: type[StreamlinedBasicBlock | StreamlinedBottleneck],
    layers: list[int],
    num_classes: int,
    reduction: int,
    pretrained_backbone: str | None,
) -> StreamlinedResNet:
    if reduction < 1:
        raise ValueError(f"reduction must be >= 1, got {reduction}")
    model = StreamlinedResNet(block, layers, num_classes=num_classes)
    if reduction != 16:
        # torchvision's ResNet builds blocks with fixed arguments, so rebuild the (freshly
        # initialised, parameter-only) attention branches for a non-default reduction.
        for m in list(model.modules()):
            if isinstance(m, StreamlinedBasicBlock | StreamlinedBottleneck):
                m.attn = ChannelAttention(m.attn.fc2.out_features, reduction)
    if pretrained_backbone is not None:
        model.load_backbone(pretrained_backbone)
    return model


def streamlined_resnet50(
    num_classes: int = 1000, reduction: int = 16, pretrained_backbone: str | None = None
) -> StreamlinedResNet:
    """ResNet-50 with streamlined channel attention (28,088,024 parameters at 1000 classes).

    ``pretrained_backbone``: local path of a torchvision resnet50 state_dict; never downloads.
    """
    return _streamlined(
        StreamlinedBottleneck, [3, 4, 6, 3], num_classes, reduction, pretrained_backbone
    )


def streamlined_resnet18(
    num_classes: int = 1000, reduction: int = 16, pretrained_backbone: str | None = None
) -> StreamlinedResNet:
    """ResNet-18 with streamlined channel attention; ``pretrained_backbone``: a resnet18 file."""
    return _streamlined(
        StreamlinedBasicBlock, [2, 2, 2, 2], num_classes, reduction, pretrained_backbone
    )


def resnet50(num_classes: int = 1000, pretrained_backbone: str | None = None) -> ResNetBaseline:
    """torchvision ResNet-50 (25,557,032 parameters at 1000 classes), the baseline."""
    model = ResNetBaseline(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
    if pretrained_backbone is not None:
        model.load_backbone(pretrained_backbone)
    return model
