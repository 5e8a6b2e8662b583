"""Residual Attention Network (Wang et al., CVPR 2017), after the authors' Caffe prototxt.

Shapes in comments are for the ImageNet layout at 224 x 224 input (Attention-56).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from ._common import AttentionAPI, AttentionMaps, init_conv_bn, upsample_bilinear

__all__ = [
    "AttentionModule",
    "PreActBottleneck",
    "ResidualAttentionNet",
    "SoftMaskBranch",
    "attention56",
    "attention56_cifar",
    "attention92",
    "attention92_cifar",
]


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


def _upsample_to(x: Tensor, ref: Tensor) -> Tensor:
    # Size from the reference tensor, not a constant, so any input size works (and ONNX export
    # keeps the size symbolic). align_corners=True is what Caffe's Interp layer computes.
    return upsample_bilinear(x, ref.shape[-2:], align_corners=True)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck unit: BN-ReLU-1x1, BN-ReLU-3x3 (strided), BN-ReLU-1x1.

    The projection shortcut exists only when channels or resolution change: an always-built
    projection would add dead parameters that never receive gradients (DDP would then need
    ``find_unused_parameters``).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        mid = max(out_ch // 4, 1)
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = _conv1x1(in_ch, mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = _conv1x1(mid, out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _conv1x1(in_ch, out_ch, stride) if stride != 1 or in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))  # N x Cin x H x W, shared by main path and projection
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))  # stride sits in the 3x3, as in the prototxt
        out = self.conv3(self.relu(self.bn3(out)))
        return out + skip


def _units(channels: int, n: int) -> nn.Sequential:
    return nn.Sequential(*(PreActBottleneck(channels, channels) for _ in range(n)))


class SoftMaskBranch(nn.Module):
    """Bottom-up/top-down soft mask with ``num_pools`` max-pools and ``num_pools - 1`` skips.

    For 3 pools at 56 x 56: pool -> unit(28) -> skip(28) -> pool -> unit(14) -> skip(14) -> pool
    -> 2 units(7) -> up to 14 + skip(14) -> unit -> up to 28 + skip(28) -> unit -> up to 56 ->
    BN-ReLU-1x1-BN-ReLU-1x1-sigmoid. Upsampling only takes its size from the down path (Caffe's
    Interp ignores the second input's values); the trunk never enters the mask.
    """

    def __init__(self, channels: int, num_pools: int) -> None:
        super().__init__()
        num_skips = max(num_pools - 1, 0)
        self.num_pools = num_pools
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)  # parameter-free: reuse ok
        # One unit per level and direction, each with its own weights.
        self.down = nn.ModuleList(PreActBottleneck(channels, channels) for _ in range(num_skips))
        self.skips = nn.ModuleList(PreActBottleneck(channels, channels) for _ in range(num_skips))
        self.bottom = _units(channels, 2)
        self.up = nn.ModuleList(PreActBottleneck(channels, channels) for _ in range(num_skips))
        self.head = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            _conv1x1(channels, channels),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            _conv1x1(channels, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        skips: list[Tensor] = []
        out = x  # N x C x 56 x 56
        for down, skip in zip(self.down, self.skips, strict=True):
            out = down(self.pool(out))  # N x C x 28 x 28, then 14 x 14
            skips.append(skip(out))
        if self.num_pools > 0:
            out = self.pool(out)  # N x C x 7 x 7
        out = self.bottom(out)
        for up, skip in zip(reversed(self.up), reversed(skips), strict=True):
            out = up(_upsample_to(out, skip) + skip)  # N x C x 14 x 14, then 28 x 28
        if self.num_pools > 0:
            out = _upsample_to(out, x)  # N x C x 56 x 56
        return self.head(out)  # in [0, 1]


class AttentionModule(nn.Module):
    """Attention module with p=1, t=2, r=1: ``last((1 + M(u)) * T(u))`` with ``u = first(x)``."""

    def __init__(self, channels: int, num_pools: int) -> None:
        super().__init__()
        self.first = PreActBottleneck(channels, channels)
        self.trunk = _units(channels, 2)
        self.mask = SoftMaskBranch(channels, num_pools)
        self.last = PreActBottleneck(channels, channels)

    def forward(self, x: Tensor, maps: AttentionMaps | None = None, key: str = "") -> Tensor:
        """Module output; with ``maps``, also stores the channel-mean mask under ``key``."""
        x = self.first(x)
        trunk = self.trunk(x)
        mask = self.mask(x)  # N x C x H x W in [0, 1]
        if maps is not None:
            # Channel mean: one spatial map per module, what overlays need.
            maps[key] = mask.mean(dim=1, keepdim=True)
        # Attention residual learning: (1 + M) * T, written as T + M * T in one fused op.
        return self.last(trunk.addcmul(mask, trunk))


class AttentionStage(nn.Module):
    """Transition unit (channel change and/or stride 2) followed by attention modules."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, num_modules: int, num_pools: int
    ) -> None:
        super().__init__()
        self.transition = PreActBottleneck(in_ch, out_ch, stride)
        self.blocks = nn.ModuleList(AttentionModule(out_ch, num_pools) for _ in range(num_modules))

    def forward(self, x: Tensor, maps: AttentionMaps | None = None, prefix: str = "") -> Tensor:
        x = self.transition(x)
        for i, block in enumerate(self.blocks):
            x = block(x, maps, f"{prefix}.{i}")
        return x


class ResidualAttentionNet(AttentionAPI, nn.Module):
    """Residual Attention Network.

    ``attention_maps(x)`` returns one map per attention module, keys ``"stage{s}.{i}"``: the
    channel mean of the soft mask, N x 1 x H x W in [0, 1] at that stage's resolution (ImageNet
    224: 56 / 28 / 14; CIFAR 32: 32 / 16 / 8). ``forward_features`` returns the final
    BN-ReLU feature map; ``forward_head`` pools it and applies the classifier.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        stem: nn.Module,
        stem_channels: int,
        widths: Sequence[int],
        modules_per_stage: Sequence[int],
        pools_per_stage: Sequence[int],
        tail: Sequence[int] = (),
    ) -> None:
        """Stage ``s`` has width ``widths[s]``; the first stage keeps the stem's resolution,
        each later one halves it. ``tail`` lists the widths of plain units after the attention
        stages (ImageNet stage 4: 2048 x 3, the first with stride 2)."""
        super().__init__()
        self.stem = stem
        stages = []
        in_ch = stem_channels
        for s, (width, n_mod, n_pool) in enumerate(
            zip(widths, modules_per_stage, pools_per_stage, strict=True)
        ):
            stages.append(AttentionStage(in_ch, width, 1 if s == 0 else 2, n_mod, n_pool))
            in_ch = width
        self.stages = nn.ModuleList(stages)
        tail_units = []
        for i, width in enumerate(tail):
            tail_units.append(PreActBottleneck(in_ch, width, 2 if i == 0 else 1))
            in_ch = width
        self.tail = nn.Sequential(*tail_units)
        self.final_norm = nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True))
        self.num_features = in_ch
        self.fc = nn.Linear(in_ch, num_classes)
        init_conv_bn(self)

    def _features(self, x: Tensor, maps: AttentionMaps | None) -> Tensor:
        x = self.stem(x)  # N x 64 x 56 x 56
        for s, stage in enumerate(self.stages, start=1):
            x = stage(x, maps, f"stage{s}")  # 256@56, 512@28, 1024@14
        x = self.tail(x)  # N x 2048 x 7 x 7
        return self.final_norm(x)

    def forward_head(self, feats: Tensor) -> Tensor:
        return self.fc(feats.mean(dim=(2, 3)))  # N x num_classes


def _imagenet_stem() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False),  # N x 64 x 112 x 112
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),  # N x 64 x 56 x 56
    )


def _imagenet(num_classes: int, modules_per_stage: Sequence[int]) -> ResidualAttentionNet:
    return ResidualAttentionNet(
        num_classes=num_classes,
        stem=_imagenet_stem(),
        stem_channels=64,
        widths=(256, 512, 1024),
        modules_per_stage=modules_per_stage,
        pools_per_stage=(3, 2, 1),
        tail=(2048, 2048, 2048),
    )


def attention56(num_classes: int = 1000) -> ResidualAttentionNet:
    """Attention-56, ImageNet layout (224 default; any multiple of 32 from 64 works)."""
    return _imagenet(num_classes, (1, 1, 1))


def attention92(num_classes: int = 1000) -> ResidualAttentionNet:
    """Attention-92, ImageNet layout (224 default; the paper evaluates it at 320)."""
    return _imagenet(num_classes, (1, 2, 3))


def _scaled(width: int, multiplier: float) -> int:
    # Multiples of 4 keep the bottleneck's C/4 an integer; 4 is the floor.
    return max(4, round(width * multiplier / 4) * 4)


MaskBottom = Literal["stage", "tail"]
# Max-pools per stage's mask (stages at 32 / 16 / 8 for 32 x 32 input).
_CIFAR_POOLS: dict[str, tuple[int, int, int]] = {"stage": (2, 1, 0), "tail": (3, 2, 1)}


def _cifar(
    num_classes: int,
    modules_per_stage: Sequence[int],
    width_multiplier: float,
    mask_bottom: MaskBottom,
) -> ResidualAttentionNet:
    if not width_multiplier > 0:
        raise ValueError(f"width_multiplier must be > 0, got {width_multiplier}")
    if mask_bottom not in _CIFAR_POOLS:
        raise ValueError(f"mask_bottom must be 'stage' or 'tail', got {mask_bottom!r}")
    stem_ch = _scaled(16, width_multiplier)
    stem = nn.Sequential(
        nn.Conv2d(3, stem_ch, kernel_size=3, padding=1, bias=False),  # N x 16 x 32 x 32, no pool
        nn.BatchNorm2d(stem_ch),
        nn.ReLU(inplace=True),
    )
    top = _scaled(256, width_multiplier)
    return ResidualAttentionNet(
        num_classes=num_classes,
        stem=stem,
        stem_channels=stem_ch,
        widths=tuple(_scaled(w, width_multiplier) for w in (64, 128, 256)),  # @32, @16, @8
        modules_per_stage=modules_per_stage,
        pools_per_stage=_CIFAR_POOLS[mask_bottom],
        # Stage-4 analogue (stride-2 unit + 2 units, 8 -> 4): it makes the depth count of the
        # name right (92 = 1 + 3 x 3 + 6 x 12 + 3 x 3 + 1, as on ImageNet).
        tail=(top, top, top),
    )


def attention56_cifar(
    num_classes: int = 10, width_multiplier: float = 1.0, mask_bottom: MaskBottom = "stage"
) -> ResidualAttentionNet:
    """Attention-56 for 32 x 32 inputs (1,147,386 parameters at 10 classes; any multiple of 8
    from 32 works).

    Layout (the paper never published its CIFAR network; this transfers the Caffe ImageNet
    topology): 3x3 stem (16) without pooling; attention stages 64@32, 128@16, 256@8; three
    256-wide units (the first strided, 8 -> 4); BN-ReLU-GAP-FC.

    ``mask_bottom``: ``"stage"`` (default) pools every soft mask down to 8 x 8, the last
    attention stage's map (2 pools + 1 skip at 32, 1 pool at 16, none at 8: the transfer in
    the project's reference); ``"tail"`` pools down to the tail's 4 x 4, as every ImageNet mask
    reaches stage 4's 7 x 7 (3 / 2 / 1 pools, the Caffe counts). ``width_multiplier`` scales
    every channel width (rounded to a multiple of 4, at least 4), e.g. 0.25 for quick CPU runs.
    Parameter counts and the departures from the paper: docs/models.md.
    """
    return _cifar(num_classes, (1, 1, 1), width_multiplier, mask_bottom)


def attention92_cifar(
    num_classes: int = 10, width_multiplier: float = 1.0, mask_bottom: MaskBottom = "stage"
) -> ResidualAttentionNet:
    """Attention-92 for 32 x 32 inputs: 2,396,410 parameters at 10 classes (2,516,794 with
    ``mask_bottom="tail"``) where the paper reports 1.9M; see docs/models.md. Layout and
    arguments as ``attention56_cifar``, with 1 / 2 / 3 attention modules per stage."""
    return _cifar(num_classes, (1, 2, 3), width_multiplier, mask_bottom)
