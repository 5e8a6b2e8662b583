"""Pieces shared by every model family: the uniform attention API and backbone loading."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

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
        logits = self.forward_head(self._features(x, maps))
        return logits, maps

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


def _read_state_dict(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained backbone file not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    # Accept training checkpoints that wrap the weights, and DDP's "module." prefix.
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _preview(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_backbone(
    model: nn.Module,
    path: str | Path,
    *,
    backbone: Callable[[str], bool],
    ignore: Callable[[str], bool] = lambda k: False,
) -> None:
    """Copy the backbone tensors of a local state_dict file into ``model``.

    ``backbone(key)`` says which of the model's keys must come from the file (the rest, e.g.
    attention branches and the classifier, keep their fresh init); file keys for which
    ``ignore(key)`` holds (e.g. the source network's classifier) are skipped. Any other
    disagreement raises ValueError naming the keys, so a wrong file never loads half-way.
    """
    source = {k: v for k, v in _read_state_dict(path).items() if not ignore(k)}
    target = {k: v for k, v in model.state_dict().items() if backbone(k)}
    missing = target.keys() - source.keys()
    unexpected = source.keys() - target.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_preview(unexpected)}")
        raise ValueError(f"pretrained backbone {path} does not match: " + "; ".join(parts))
    bad_shapes = [
        f"{k} {tuple(source[k].shape)} vs {tuple(v.shape)}"
        for k, v in target.items()
        if source[k].shape != v.shape
    ]
    if bad_shapes:
        raise ValueError(
            f"pretrained backbone {path} has shape mismatches (file vs model): "
            + _preview(bad_shapes)
        )
    model.load_state_dict(source, strict=False)
