"""Attention CNNs behind one registry and one interface.

Every model returned by :func:`create_model` provides ``forward(x) -> logits``,
``forward_features(x)`` / ``forward_head(feats)``, ``forward_with_attention(x)`` and
``attention_maps(x) -> dict[str, Tensor]``.
"""

from ._common import AttentionAPI, AttentionMaps
from .registry import (
    ModelError,
    ModelInfo,
    UnknownModelArgumentError,
    count_macs,
    count_parameters,
    create_model,
    default_input_size,
    describe_models,
    format_model_table,
    list_models,
    model_kwargs,
)

__all__ = [
    "AttentionAPI",
    "AttentionMaps",
    "ModelError",
    "ModelInfo",
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
