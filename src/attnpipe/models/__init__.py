"""Attention CNNs behind one registry and one interface.

Every model returned by :func:`create_model` provides ``forward(x) -> logits``,
``forward_features(x)`` / ``forward_head(feats)``, ``forward_with_attention(x)`` and
``attention_maps(x) -> dict[str, Tensor]``, with at least one spatial map (N x 1 x h x w);
:func:`spatial_maps` / :func:`spatial_attention` extract those. ``create_model(...,
pretrained="imagenet")`` loads torchvision's ImageNet backbones (see ``pretrained``);
``pretrained="models/<name>/model.pt"`` starts from a model trained here (see ``transfer``).

The names are imported on first use (PEP 562): what a recipe check needs (the catalogue, the
errors) comes without torch, which the data stages' processes then never import.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and for codeversion, which reads imports from the source
    from ._common import AttentionAPI, AttentionMaps
    from .attention import spatial_attention, spatial_maps
    from .catalog import (
        IMAGENET,
        Pretrained,
        check_pretrained,
        classifier_name,
        default_input_size,
        imagenet_models,
        list_models,
        model_kwargs,
        supports_imagenet,
    )
    from .errors import ModelError, PretrainedWeightsError, UnknownModelArgumentError
    from .pretrained import OFFLINE_ENV
    from .registry import (
        ModelInfo,
        check_pretrained_file,
        count_macs,
        count_parameters,
        create_model,
        describe_models,
        fetch_imagenet_weights,
        format_model_table,
    )
    from .transfer import TransferReport

__all__ = [
    "IMAGENET",
    "OFFLINE_ENV",
    "AttentionAPI",
    "AttentionMaps",
    "ModelError",
    "ModelInfo",
    "Pretrained",
    "PretrainedWeightsError",
    "TransferReport",
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
    "spatial_attention",
    "spatial_maps",
    "supports_imagenet",
]
# Where a public name is looked for on first use, in this order: the torch-free modules first.
_SUBMODULES = ("errors", "catalog", "attention", "_common", "pretrained", "transfer", "registry")


def __getattr__(name: str) -> object:
    if name in __all__:
        for submodule in _SUBMODULES:
            module = import_module(f".{submodule}", __name__)
            if hasattr(module, name):
                value = getattr(module, name)
                globals()[name] = value  # later lookups skip this function
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
