"""Which models there are, what each takes and what it can start from: known without torch.

The recipe check runs in every stage's process, the data stages' included, and importing torch
and torchvision only to learn a model's name and arguments costs each of them seconds (7 s of
CPU per process on a 2-core machine). So this module imports neither: a model's keyword
arguments and their defaults are read from its factory's signature in the source file, the
one definition (the registry builds the model from the same function).
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .errors import ModelError, PretrainedWeightsError

__all__ = [
    "CATALOG",
    "IMAGENET",
    "ModelEntry",
    "Pretrained",
    "check_pretrained",
    "classifier_name",
    "default_input_size",
    "entry",
    "imagenet_models",
    "list_models",
    "model_kwargs",
    "supports_imagenet",
]

IMAGENET = "imagenet"
# None (fresh init), "imagenet" (torchvision's weights) or the path of a local file: a model.pt
# of this project or a state_dict.
Pretrained = str | os.PathLike[str] | None


@dataclass(frozen=True)
class ModelEntry:
    """A registry model: its factory is the function `name` in `attnpipe.models.<module>`."""

    name: str
    module: str
    input_size: int
    summary_classes: int  # classes used for the parameter/MAC summary (1000 unless CIFAR)
    # The module that outputs the logits (timm's default_cfg["classifier"]): the part of a
    # pretrained model.pt that starts fresh when the number of classes differs.
    classifier: str
    # The torchvision ImageNet backbone whose weights `pretrained="imagenet"` loads (None: no
    # pretrained backbone); the registry maps it to torchvision's weights.
    backbone: str | None = None


CATALOG = (
    ModelEntry("attention56", "residual_attention", 224, 1000, "fc"),
    ModelEntry("attention92", "residual_attention", 224, 1000, "fc"),
    ModelEntry("attention56_cifar", "residual_attention", 32, 10, "fc"),
    ModelEntry("attention92_cifar", "residual_attention", 32, 10, "fc"),
    ModelEntry("attnvgg16", "attn_vgg", 224, 1000, "classifier", "vgg16_bn"),
    ModelEntry("ltpa_vgg_cifar", "ltpa", 32, 100, "classifier"),
    ModelEntry("resnet50", "resnet", 224, 1000, "fc", "resnet50"),
    ModelEntry("se_resnet18", "resnet", 224, 1000, "fc", "resnet18"),
    ModelEntry("se_resnet50", "resnet", 224, 1000, "fc", "resnet50"),
    ModelEntry("streamlined_resnet18", "resnet", 224, 1000, "fc", "resnet18"),
    ModelEntry("streamlined_resnet50", "resnet", 224, 1000, "fc", "resnet50"),
)
_BY_NAME = {model.name: model for model in CATALOG}


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_BY_NAME)


def entry(name: str) -> ModelEntry:
    """The catalogue entry of model `name`; ModelError naming the choices if there is none."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ModelError(
            f"unknown model {name!r}; choose one of: {', '.join(list_models())}"
        ) from None


def model_kwargs(name: str) -> dict[str, object]:
    """Optional keyword arguments of model ``name`` (besides ``num_classes``) and defaults."""
    return dict(_factory_defaults(entry(name)))


@cache
def _factory_defaults(model: ModelEntry) -> tuple[tuple[str, object], ...]:
    """The factory's parameters with their defaults, read from its source: every factory's
    defaults are literals (a test compares this with `inspect.signature` of the function)."""
    source = Path(__file__).with_name(f"{model.module}.py")
    tree = ast.parse(source.read_text(encoding="utf-8"))
    function = next(
        node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == model.name
    )
    arguments = function.args
    positional = arguments.posonlyargs + arguments.args
    defaults = [None] * (len(positional) - len(arguments.defaults)) + arguments.defaults
    pairs = [
        *zip(positional, defaults, strict=True),
        *zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True),
    ]
    return tuple(
        (argument.arg, ast.literal_eval(default))
        for argument, default in pairs
        if argument.arg != "num_classes" and default is not None
    )


def default_input_size(name: str) -> int:
    """Side of the square input the model is designed for (224 ImageNet, 32 CIFAR layouts)."""
    return entry(name).input_size


def imagenet_models() -> list[str]:
    """Names of the models that accept ``pretrained="imagenet"`` (or a local backbone file)."""
    return [name for name in list_models() if _BY_NAME[name].backbone is not None]


def supports_imagenet(name: str) -> bool:
    """Whether model ``name`` has a torchvision ImageNet backbone (ValueError if unknown)."""
    return entry(name).backbone is not None


def classifier_name(name: str) -> str:
    """The module of model ``name`` that outputs the logits (timm's ``classifier``)."""
    return entry(name).classifier


def check_pretrained(name: str, pretrained: Pretrained) -> None:
    """Validate a ``pretrained`` choice for model ``name`` without reading anything.

    None and file paths always pass; "imagenet" only for ``imagenet_models()``. Raises
    PretrainedWeightsError (a ValueError) with a one-line message otherwise. A file is read
    by ``check_pretrained_file`` and when the model is built.
    """
    model = entry(name)
    if pretrained is None:
        return
    if not isinstance(pretrained, str | os.PathLike) or str(pretrained) == "":
        raise PretrainedWeightsError(
            f"pretrained must be None, {IMAGENET!r} or the path of a model.pt or state_dict "
            f"file, got {pretrained!r}"
        )
    if pretrained == IMAGENET and model.backbone is None:
        raise PretrainedWeightsError(
            f"model {name!r} has no ImageNet weights (pretrained={IMAGENET!r}); models with "
            f"ImageNet backbones: {', '.join(imagenet_models())}; any model can start from "
            "a model.pt trained here"
        )
