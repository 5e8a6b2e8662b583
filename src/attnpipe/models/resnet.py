"""ResNets on torchvision's building blocks: the plain baseline, squeeze-and-excitation ResNets
and the streamlined-attention ResNets. Shapes in comments are for 224 x 224 input (ResNet-50).

Every ResNet here also returns a class activation map (``"cam"``, N x 1 x h x w): the score of
the predicted class at each position of the last feature map, computed from the same pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ._common import AttentionAPI, AttentionMaps, class_activation_map
from .pretrained import load_backbone

__all__ = [
    "AttendedBasicBlock",
    "AttendedBottleneck",
    "AttendedResNet",
    "ResNetBaseline",
    "SqueezeExcitation",
    "StreamlinedAttention",
    "resnet50",
    "se_resnet18",
    "se_resnet50",
    "streamlined_resnet18",
    "streamlined_resnet50",
]

Head = Literal["linear", "mlp"]


class SqueezeExcitation(nn.Module):
    """GAP -> FC(C -> C/r) -> ReLU -> FC(C/r -> C) -> sigmoid; both FCs with bias (Hu et al.)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Linear(channels, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        """Channel weights N x C in [0, 1] for feature map ``x`` (N x C x H x W)."""
        return torch.sigmoid(self.fc2(self.relu(self.fc1(x.mean(dim=(2, 3))))))


class StreamlinedAttention(nn.Module):
    """The streamlined module: GAP -> one linear layer C -> C without bias, ungated.

    Its output scales the block's features channel by channel, so the block computes a
    second-order term (features times a linear function of their own average). There is no
    reduction, ReLU or sigmoid: the weights are unbounded and may be negative.

    Initialisation is PyTorch's ``nn.Linear`` default, as in the author's code (which never
    re-initialises the layer): U(-1/sqrt(C), 1/sqrt(C)), so each channel's scale starts as a
    random signed combination of the C channel means, with standard deviation rms(mean) /
    sqrt(3). The features come straight out of BatchNorm, whose per-image channel means are
    small, so the scales start small (mean |scale| 0.02-0.11 per block at a fresh init): each
    block starts close to its skip path instead of being blown up. The ungated product is
    less tolerant of large learning rates than a gated one; docs/models.md has the numbers.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Channel scales N x C (unbounded) for feature map ``x`` (N x C x H x W)."""
        return self.fc(x.mean(dim=(2, 3)))


def _attended_residual(
    block: AttendedBasicBlock | AttendedBottleneck,
    x: Tensor,
    out: Tensor,
    maps: AttentionMaps | None,
    key: str,
) -> Tensor:
    # Shared tail of both blocks: scale the residual branch, then skip-add and ReLU.
    w = block.attn(out)  # N x C
    if maps is not None:
        maps[key] = w
    out = out * w[:, :, None, None]
    identity = x if block.downsample is None else block.downsample(x)
    return block.relu(out + identity)


class AttendedBottleneck(Bottleneck):
    """torchvision Bottleneck whose residual branch is scaled by ``attn`` before the add.

    ``attn`` (a module mapping N x C x H x W to N x C) is attached by the model builder, since
    torchvision's ``ResNet`` constructs blocks with fixed arguments.
    """

    attn: nn.Module

    def forward(self, x: Tensor, maps: AttentionMaps | None = None, key: str = "") -> Tensor:
        """Block output; with ``maps``, also stores the channel weights under ``key``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))  # N x 4*planes x H x W
        return _attended_residual(self, x, out, maps, key)


class AttendedBasicBlock(BasicBlock):
    """torchvision BasicBlock whose residual branch is scaled by ``attn`` before the add."""

    attn: nn.Module

    def forward(self, x: Tensor, maps: AttentionMaps | None = None, key: str = "") -> Tensor:
        """Block output; with ``maps``, also stores the channel weights under ``key``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))  # N x planes x H x W
        return _attended_residual(self, x, out, maps, key)


_LAYERS = ("layer1", "layer2", "layer3", "layer4")


class _ResNetAPI(AttentionAPI, ResNet):
    """torchvision ResNet with the registry's forward_features / forward_head split and a CAM.

    Parameter names are torchvision's, so torchvision state_dicts load by key.
    """

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))  # N x 64 x 56 x 56

    def forward_head(self, feats: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(feats), 1))  # N x num_classes

    def _head_maps(self, feats: Tensor, logits: Tensor, maps: AttentionMaps) -> None:
        maps["cam"] = class_activation_map(self.fc, feats, logits.argmax(dim=1))

    def load_backbone(
        self, source: str | Path | Mapping[str, Tensor], origin: str | None = None
    ) -> None:
        """Load a torchvision ResNet state_dict of the same depth (its ``fc`` is ignored)."""
        load_backbone(
            self,
            source,
            origin=origin,
            backbone=lambda k: not k.startswith("fc.") and ".attn." not in k,
            ignore=lambda k: k.startswith("fc."),
        )


class ResNetBaseline(_ResNetAPI):
    """Plain torchvision ResNet.

    ``attention_maps(x)``: ``"cam"`` only, N x 1 x H/32 x W/32 (see ``AttendedResNet``).
    """

    def _features(self, x: Tensor, maps: AttentionMaps | None) -> Tensor:
        x = self._stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))  # N x 2048 x 7 x 7


class AttendedResNet(_ResNetAPI):
    """ResNet whose every block scales its residual branch by a channel-attention module.

    ``attention_maps(x)``: one entry per block, keys ``"layer{k}.{i}"``, the channel weights
    N x C of that block (C = its output channels; in [0, 1] for squeeze-and-excitation,
    unbounded for the streamlined module), then ``"cam"``: the class activation map of the
    predicted class (argmax of the same pass's logits), N x 1 x H/32 x W/32. With a linear
    head it is exactly ``fc.weight[k] . feats[:, :, i, j] + fc.bias[k]``; with the MLP head the
    head is applied to each position's feature vector (the same thing in eval mode, where the
    MLP is affine). Its spatial mean is the predicted class's logit.
    """

    def __init__(
        self,
        block: type[AttendedBasicBlock | AttendedBottleneck],
        layers: list[int],
        num_classes: int,
        attention: Callable[[int], nn.Module],
    ) -> None:
        super().__init__(block, layers, num_classes=num_classes)
        for name in _LAYERS:
            for b in getattr(self, name):
                b.attn = attention(_out_channels(b))

    def _features(self, x: Tensor, maps: AttentionMaps | None) -> Tensor:
        x = self._stem(x)
        for name in _LAYERS:
            for i, block in enumerate(getattr(self, name)):
                x = block(x, maps, f"{name}.{i}")
        return x  # N x 2048 x 7 x 7 (ResNet-50)


def _out_channels(block: BasicBlock | Bottleneck) -> int:
    last = block.conv3 if isinstance(block, Bottleneck) else block.conv2
    return last.out_channels


def mlp_head(in_features: int, num_classes: int) -> nn.Sequential:
    """The streamlined author's classifier: in -> 1024 -> 512 -> K linear layers, dropout 0.5.

    As in the author's ``OurModel.py`` (``resnet50``): Linear, Dropout(0.5), Linear,
    Dropout(0.5), Linear, with no activation between them (so in eval mode the head is one
    affine map in factored form; dropout is its only regulariser).
    """
    return nn.Sequential(
        nn.Linear(in_features, 1024),
        nn.Dropout(0.5),
        nn.Linear(1024, 512),
        nn.Dropout(0.5),
        nn.Linear(512, num_classes),
    )


def _with_head(model: AttendedResNet, head: Head, num_classes: int) -> AttendedResNet:
    if head not in ("linear", "mlp"):
        raise ValueError(f"head must be 'linear' or 'mlp', got {head!r}")
    if head == "mlp":
        model.fc = mlp_head(model.fc.in_features, num_classes)
    return model


def _se(layers: list[int], block: type, num_classes: int, reduction: int) -> AttendedResNet:
    if not isinstance(reduction, int) or reduction < 1:
        raise ValueError(f"reduction must be an int >= 1, got {reduction!r}")
    return AttendedResNet(block, layers, num_classes, lambda c: SqueezeExcitation(c, reduction))


def se_resnet50(num_classes: int = 1000, reduction: int = 16) -> AttendedResNet:
    """Squeeze-and-excitation ResNet-50 (28,088,024 parameters at 1000 classes, r = 16).

    An SE block (Hu et al., CVPR 2018) on every bottleneck's residual branch before the add.
    """
    return _se([3, 4, 6, 3], AttendedBottleneck, num_classes, reduction)


def se_resnet18(num_classes: int = 1000, reduction: int = 16) -> AttendedResNet:
    """Squeeze-and-excitation ResNet-18 (11,778,592 parameters at 1000 classes, r = 16)."""
    return _se([2, 2, 2, 2], AttendedBasicBlock, num_classes, reduction)


def streamlined_resnet50(num_classes: int = 1000, head: Head = "linear") -> AttendedResNet:
    """ResNet-50 with the streamlined attention module in every block.

    Source: myspace-img/streamlined-attention (``OurModelModule.SLayer``, ``OurModel.resnet50``).
    45,676,584 parameters at 1000 classes with the linear head (20,119,552 of them attention).
    ``head="mlp"``: the author's 2048-1024-512-K classifier (see ``mlp_head``).
    """
    model = AttendedResNet(AttendedBottleneck, [3, 4, 6, 3], num_classes, StreamlinedAttention)
    return _with_head(model, head, num_classes)


def streamlined_resnet18(num_classes: int = 1000, head: Head = "linear") -> AttendedResNet:
    """ResNet-18 with the streamlined attention module in every block (the author's
    ``resnet18``); ``head="mlp"`` adds a 512-1024-512-K classifier built like ``mlp_head``."""
    model = AttendedResNet(AttendedBasicBlock, [2, 2, 2, 2], num_classes, StreamlinedAttention)
    return _with_head(model, head, num_classes)


def resnet50(num_classes: int = 1000) -> ResNetBaseline:
    """torchvision ResNet-50 (25,557,032 parameters at 1000 classes), the baseline."""
    return ResNetBaseline(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
