"""Attention CNNs behind one registry and one interface.

Every model returned by :func:`create_model` provides ``forward(x) -> logits``,
``forward_features(x)`` / ``forward_head(feats)``, ``forward_with_attention(x)`` and
``attention_maps(x) -> dict[str, Tensor]``, with at least one spatial map (N x 1 x h x w);
:func:`spatial_maps` / :func:`spatial_attention` extract those. ``create_model(...,
pretrained="imagenet")`` loads torchvision's ImageNet backbones (see ``pretrained``);
``pretrained="models/<name>/model.pt"`` starts from a model trained here (see ``transfer``).
"""

from ._common import AttentionAPI, AttentionMaps
from .attention import spatial_attention, spatial_maps
from .pretrained import OFFLINE_ENV, PretrainedWeightsError
from .registry import (
    IMAGENET,
    ModelError,
    ModelInfo,
    Pretrained,
    UnknownModelArgumentError,
    check_pretrained,
    check_pretrained_file,
    classifier_name,
    count_macs,
    count_parameters,
    create_model,
    default_input_size,
    describe_models,
    fetch_imagenet_weights,
    format_model_table,
    imagenet_models,
    list_models,
    model_kwargs,
    supports_imagenet,
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
