"""The models' errors, importable without torch (the recipe check uses them in every stage)."""

from __future__ import annotations


class ModelError(ValueError):
    """A model that cannot be built as asked (unknown name or argument, unusable weights)."""


class PretrainedWeightsError(ModelError):
    """Pretrained weights that cannot be used: not cached offline, not downloadable, a missing
    or mismatched file, or a model without a pretrained backbone. Always one line."""


class UnknownModelArgumentError(ModelError, TypeError):
    """A keyword argument the chosen model does not take.

    Both a TypeError (Python's convention for a bad keyword) and a ValueError (what config
    validation catches), so callers may handle either.
    """
