"""Model registry: names -> factories, construction with checked kwargs, and a summary table."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import (
    ResNet18_Weights,
    ResNet50_Weights,
    VGG16_BN_Weights,
    WeightsEnum,
)

from . import attn_vgg, ltpa, residual_attention, resnet
from .catalog import (
    IMAGENET,
    ModelEntry,
    Pretrained,
    check_pretrained,
    classifier_name,
    default_input_size,
    entry,
    imagenet_models,
    list_models,
    model_kwargs,
    supports_imagenet,
)
from .errors import ModelError, PretrainedWeightsError, UnknownModelArgumentError
from .pretrained import ensure_imagenet_file, load_imagenet_state_dict
from .transfer import PretrainedFile, load_whole_model, read_pretrained_file

__all__ = [
    "IMAGENET",
    "ModelError",
    "ModelInfo",
    "Pretrained",
    "UnknownModelArgumentError",
    "check_pretrained",
    "check_pretrained_file",
    "classifier_name",
    "count_macs",
    "count_parameters",
    "create_model",
    "default_input_size",
    "describe_models",
    "fetch_imagenet_weights",
    "format_model_table",
    "imagenet_models",
    "list_models",
    "model_kwargs",
    "supports_imagenet",
]

_FAMILIES = {
    "attn_vgg": attn_vgg,
    "ltpa": ltpa,
    "residual_attention": residual_attention,
    "resnet": resnet,
}
# ResNet-50 V1 (76.13% top-1) is the file the streamlined author's code loads (resnet50-19c8e357,
# re-saved by torchvision under the V1 name, pytorch/vision#2068); V2 is a 2021 recipe.
# VGG16-BN V1 is the only vgg16_bn weights, what AttnMel loads.
_BACKBONE_WEIGHTS: dict[str, WeightsEnum] = {
    "resnet18": ResNet18_Weights.IMAGENET1K_V1,
    "resnet50": ResNet50_Weights.IMAGENET1K_V1,
    "vgg16_bn": VGG16_BN_Weights.IMAGENET1K_V1,
}


def _factory(model: ModelEntry) -> Callable[..., nn.Module]:
    """The function that builds `model`: `attnpipe.models.<module>.<name>`."""
    return getattr(_FAMILIES[model.module], model.name)


def _imagenet_weights(model: ModelEntry) -> WeightsEnum | None:
    """torchvision's ImageNet weights of the model's backbone (None: no pretrained backbone).
    A model with them implements ``load_backbone(state_dict_or_path)``."""
    return _BACKBONE_WEIGHTS[model.backbone] if model.backbone else None


def check_pretrained_file(
    name: str, path: str | os.PathLike[str], kwargs: Mapping[str, object] | None = None
) -> None:
    """Check, without building the model, that file ``path`` can start model ``name`` built
    with ``kwargs``: it exists, is readable and, for a model.pt, was made by the same
    architecture. PretrainedWeightsError (one line) otherwise; tensor shapes are checked when
    the model is built."""
    entry(name)
    _check_architecture(name, dict(kwargs or {}), read_pretrained_file(path))


def _check_architecture(name: str, kwargs: dict[str, object], source: PretrainedFile) -> None:
    if not source.is_model_file:
        return  # a plain state_dict records no architecture: its keys are checked on loading
    want = {**model_kwargs(name), **kwargs}
    file_name = str(source.model_name)
    known = model_kwargs(file_name) if file_name in list_models() else {}
    have = {**known, **source.model_kwargs}
    if (file_name, have) != (name, want):
        raise PretrainedWeightsError(
            f"{source.origin} holds {_signature(file_name, have)} but the model to build is "
            f"{_signature(name, want)}: a model.pt starts only the same architecture; use its "
            "model name and kwargs, or a file of this architecture"
        )


def _signature(name: str, kwargs: Mapping[str, object]) -> str:
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


def fetch_imagenet_weights(name: str) -> Path:
    """Make sure the ImageNet weights of model ``name`` are in torch's hub cache; their path.

    Downloads unless ``ATTNPIPE_OFFLINE=1`` (then a missing file is an error). Call it once
    before starting workers that all build the model, so they do not download concurrently.
    """
    check_pretrained(name, IMAGENET)
    weights = _imagenet_weights(entry(name))
    assert weights is not None  # guaranteed by check_pretrained
    return ensure_imagenet_file(weights, name)


def create_model(
    name: str, num_classes: int, pretrained: Pretrained = None, **kwargs: object
) -> nn.Module:
    """Build registry model ``name`` with ``num_classes`` outputs.

    ``pretrained``: None (fresh init); "imagenet": torchvision's ImageNet weights from torch's
    hub cache, downloaded unless ``ATTNPIPE_OFFLINE=1`` (see ``attnpipe.models.pretrained``),
    of which only backbone tensors load (attention branches and classifier keep their fresh
    init); or the path of a local file (relative to the current directory): a model.pt of this
    project, of the same name and kwargs, or a state_dict of this model, loads every tensor but
    a classifier of another class count (see ``attnpipe.models.transfer``; the model's
    ``pretrained_summary`` says what loaded, also logged to "attnpipe.models"), and for
    ``imagenet_models()`` any other state_dict is taken as one of the torchvision backbone.

    Raises ValueError for an unknown name, UnknownModelArgumentError (a TypeError and a
    ValueError) for a keyword the model does not take, and PretrainedWeightsError (a
    ValueError) for unusable pretrained weights; all messages are one line.
    """
    spec = entry(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    valid = model_kwargs(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        choices = ", ".join([*(f"{k}={v!r}" for k, v in valid.items()), "pretrained=None"])
        raise UnknownModelArgumentError(
            f"model {name!r} got unexpected argument(s) {', '.join(unknown)}; "
            f"valid arguments: {choices}"
        )
    check_pretrained(name, pretrained)
    # Read before building: a missing or mismatched file fails fast, without a model's
    # construction time.
    source = _pretrained_source(spec, pretrained, kwargs)
    model = _factory(spec)(num_classes=num_classes, **kwargs)
    if source is not None:
        _load_pretrained(model, spec, source, num_classes, backbone=pretrained == IMAGENET)
    return model


def _pretrained_source(
    spec: ModelEntry, pretrained: Pretrained, kwargs: dict[str, object]
) -> PretrainedFile | None:
    if pretrained is None:
        return None
    if pretrained == IMAGENET:
        weights = _imagenet_weights(spec)
        assert weights is not None  # guaranteed by check_pretrained
        state = load_imagenet_state_dict(weights, spec.name)
        return PretrainedFile(f"{weights} ({weights.url})", state)
    source = read_pretrained_file(pretrained)
    _check_architecture(spec.name, kwargs, source)
    return source


def _load_pretrained(
    model: nn.Module, spec: ModelEntry, source: PretrainedFile, num_classes: int, backbone: bool
) -> None:
    """A backbone load (the ImageNet weights, or a plain state_dict that is not this model's,
    for a model with a torchvision backbone) or a whole-model load (everything else)."""
    if not source.is_model_file and spec.backbone is not None:
        backbone = backbone or source.state.keys() != model.state_dict().keys()
    if backbone:
        model.load_backbone(source.state, origin=source.origin)
        return
    report = load_whole_model(
        model, source, head=spec.classifier, name=spec.name, num_classes=num_classes
    )
    # Read by whoever builds the model (the trainer prints it once, from rank 0).
    model.pretrained_summary = str(report)


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
    imagenet: bool = False  # `pretrained="imagenet"` is available


def describe_models(names: Sequence[str] | None = None) -> list[ModelInfo]:
    """One row per model: trainable parameters, MACs at the default input, attention map names.

    Parameters are counted at 1000 classes for ImageNet layouts and at the CIFAR layouts'
    default class count (see ``ModelInfo.num_classes``).
    """
    rows = []
    for name in names if names is not None else list_models():
        spec = entry(name)
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
                imagenet=spec.backbone is not None,
            )
        )
    return rows


def _compact(names: tuple[str, ...], limit: int = 4) -> str:
    if not names:
        return "-"
    if len(names) <= limit:
        return ", ".join(names)
    # The last name stays visible: it is the deepest map (the CAM of the ResNets).
    return f"{', '.join(names[: limit - 1])}, ..., {names[-1]} ({len(names)} maps)"


def format_model_table(rows: Sequence[ModelInfo] | None = None) -> str:
    """Plain-text table of ``describe_models()`` rows (computed when not given)."""
    rows = describe_models() if rows is None else rows
    header = ("model", "params", "classes", "GMACs", "input", "ImageNet", "attention maps")
    body = [
        (
            r.name,
            f"{r.params:,}",
            str(r.num_classes),
            f"{r.macs / 1e9:.3f}",
            f"{r.input_size}x{r.input_size}",
            "yes" if r.imagenet else "-",
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
