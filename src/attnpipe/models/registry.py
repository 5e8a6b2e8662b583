"""Model registry: names -> factories, construction with checked kwargs, and a summary table."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import attn_vgg, ltpa, residual_attention, resnet

__all__ = [
    "ModelError",
    "ModelInfo",
    "ModelSpec",
    "UnknownModelArgumentError",
    "count_macs",
    "count_parameters",
    "create_model",
    "default_input_size",
    "describe_models",
    "format_model_table",
    "list_models",
    "model_kwargs",
]


class ModelError(ValueError):
    """A model that cannot be built as asked (unknown name or argument, unusable weights)."""


class UnknownModelArgumentError(ModelError, TypeError):
    """A keyword argument the chosen model does not take.

    Both a TypeError (Python's convention for a bad keyword) and a ValueError (what config
    validation catches), so callers may handle either.
    """


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[..., nn.Module]
    input_size: int
    summary_classes: int  # classes used for the parameter/MAC summary (1000 unless CIFAR)


_SPECS = (
    ModelSpec("attention56", residual_attention.attention56, 224, 1000),
    ModelSpec("attention92", residual_attention.attention92, 224, 1000),
    ModelSpec("attention56_cifar", residual_attention.attention56_cifar, 32, 10),
    ModelSpec("attention92_cifar", residual_attention.attention92_cifar, 32, 10),
    ModelSpec("attnvgg16", attn_vgg.attnvgg16, 224, 1000),
    ModelSpec("ltpa_vgg_cifar", ltpa.ltpa_vgg_cifar, 32, 100),
    ModelSpec("streamlined_resnet18", resnet.streamlined_resnet18, 224, 1000),
    ModelSpec("streamlined_resnet50", resnet.streamlined_resnet50, 224, 1000),
    ModelSpec("resnet50", resnet.resnet50, 224, 1000),
)
# Read-only view: the registry is fixed at import time, nothing registers at runtime.
_REGISTRY = MappingProxyType({spec.name: spec for spec in _SPECS})


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def _spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ModelError(
            f"unknown model {name!r}; choose one of: {', '.join(list_models())}"
        ) from None


def model_kwargs(name: str) -> dict[str, object]:
    """Optional keyword arguments of model ``name`` (besides ``num_classes``) and defaults."""
    params = inspect.signature(_spec(name).factory).parameters
    return {k: p.default for k, p in params.items() if k != "num_classes"}


def default_input_size(name: str) -> int:
    """Side of the square input the model is designed for (224 ImageNet, 32 CIFAR layouts)."""
    return _spec(name).input_size


def create_model(name: str, num_classes: int, **kwargs: object) -> nn.Module:
    """Build registry model ``name`` with ``num_classes`` outputs.

    Raises ValueError for an unknown name and UnknownModelArgumentError (a TypeError and a
    ValueError) for a keyword the model does not take; both messages list the valid choices.
    """
    spec = _spec(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    valid = model_kwargs(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        choices = ", ".join(f"{k}={v!r}" for k, v in valid.items()) or "none"
        raise UnknownModelArgumentError(
            f"model {name!r} got unexpected argument(s) {', '.join(unknown)}; "
            f"valid arguments: {choices}"
        )
    return spec.factory(num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: nn.Module, input_size: int, batch: int = 1) -> int:
    """Multiply-adds of one eval-mode forward pass per image (conv / linear / matmul ops).

    FlopCounterMode counts 2 FLOPs per multiply-add; elementwise ops, pooling and
    normalisation are not counted, matching the usual ResNet-50 = 4.1 G convention.
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(batch, 3, input_size, input_size, dtype=param.dtype, device=param.device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2 // batch


@dataclass(frozen=True)
class ModelInfo:
    name: str
    params: int
    num_classes: int
    macs: int
    input_size: int
    attention_maps: tuple[str, ...]


def describe_models(names: Sequence[str] | None = None) -> list[ModelInfo]:
    """One row per model: trainable parameters, MACs at the default input, attention map names.

    Parameters are counted at 1000 classes for ImageNet layouts and at the CIFAR layouts'
    default class count (see ``ModelInfo.num_classes``).
    """
    rows = []
    for name in names if names is not None else list_models():
        spec = _spec(name)
        model = create_model(name, spec.summary_classes).eval()
        x = torch.zeros(1, 3, spec.input_size, spec.input_size)
        # One pass gives both: map extraction adds only reductions, which are not counted.
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            map_names = tuple(model.attention_maps(x))
        rows.append(
            ModelInfo(
                name=name,
                params=count_parameters(model),
                num_classes=spec.summary_classes,
                macs=counter.get_total_flops() // 2,
                input_size=spec.input_size,
                attention_maps=map_names,
            )
        )
    return rows


def _compact(names: tuple[str, ...], limit: int = 4) -> str:
    if not names:
        return "-"
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])}, ... ({len(names)} maps)"


def format_model_table(rows: Sequence[ModelInfo] | None = None) -> str:
    """Plain-text table of ``describe_models()`` rows (computed when not given)."""
    rows = describe_models() if rows is None else rows
    header = ("model", "params", "classes", "GMACs", "input", "attention maps")
    body = [
        (
            r.name,
            f"{r.params:,}",
            str(r.num_classes),
            f"{r.macs / 1e9:.3f}",
            f"{r.input_size}x{r.input_size}",
            _compact(r.attention_maps),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
    right = {1, 2, 3}  # numeric columns

    def fmt(row: tuple[str, ...]) -> str:
        cells = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    lines = [fmt(header), "  ".join("-" * w for w in widths), *(fmt(row) for row in body)]
    return "\n".join(lines)
