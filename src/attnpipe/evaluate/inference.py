"""Reading image files like evaluation does (for `predict`), and flip TTA on numpy models."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from attnpipe.config import AugmentConfig
from attnpipe.data.images import load_rgb
from attnpipe.data.loaders import build_transform

# The decompression-bomb guard for files given to `predict` (prepare's default).
PREDICT_MAX_PIXELS = 90_000_000


def flip_tta_numpy(
    predict: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, flip_tta: bool
) -> np.ndarray:
    """The same averaging for a function from NCHW float32 batches to probabilities."""
    probs = predict(batch)
    if flip_tta:
        probs = (probs + predict(np.ascontiguousarray(batch[..., ::-1]))) / 2
    return probs


def eval_transform(
    input_size: int, mean: Sequence[float], std: Sequence[float], crop_ratio: float = 1.0
) -> Callable:
    """Evaluation's transform (resize the shorter side, centre-crop, normalise)."""
    augment = AugmentConfig(mean=tuple(mean), std=tuple(std))
    return build_transform(augment, input_size, train=False, crop_ratio=crop_ratio)


def load_image_tensor(path: Path, transform: Callable) -> torch.Tensor:
    """Decode `path` like `prepare` does (EXIF, any mode to RGB), then apply `transform`.

    Raises `attnpipe.data.images.BadImage` for a file that is not a usable image.
    """
    image = load_rgb(path, PREDICT_MAX_PIXELS)
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return transform(array)
