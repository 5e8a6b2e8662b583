"""Attention overlays: an image with its attention maps blended over it, for W&B and the report.

Defined once here and imported by both the training loop (W&B images of the best model) and
the report (`attnpipe.evaluate.figures.attention_figure` lays the overlays out). The maps come
from the models (`attnpipe.models.attention.spatial_attention`); this module only draws.

Shapes: images are uint8 (H, W, 3); attention maps as the models return them, N x 1 x h x w
(spatial maps: Residual Attention soft masks, grid / LTPA attention, class activation maps).
Channel weights (N x C) have no spatial layout and are not drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from attnpipe.models.attention import spatial_attention

ATTENTION_CMAP = "turbo"
OVERLAY_ALPHA = 0.55
# Overlays of small inputs (32 x 32) are upscaled so the blended map reads as a smooth field.
OVERLAY_MIN_SIDE = 128
MAX_MAPS_SHOWN = 4


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised (N, 3, H, W) tensors back to displayable uint8 (N, H, W, 3)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = (images.detach().float().cpu() * s + m).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def pick_maps(names: Sequence[str], limit: int = MAX_MAPS_SHOWN) -> list[str]:
    """At most `limit` names, evenly spread from shallow to deep (first and last kept)."""
    names = list(names)
    if len(names) <= limit:
        return names
    picks = np.linspace(0, len(names) - 1, limit).round().astype(int)
    return [names[i] for i in sorted(set(picks.tolist()))]


def attention_overlays(
    image: np.ndarray,
    maps: Mapping[str, torch.Tensor | np.ndarray],
    alpha: float = OVERLAY_ALPHA,
    min_side: int = OVERLAY_MIN_SIDE,
    cmap: str = ATTENTION_CMAP,
) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """Blend each attention map of ONE image over it.

    `image`: uint8 (H, W, 3), what the model saw; `maps`: name -> (h, w) map of that image.
    Each map is bilinearly resized to the image and min-max normalised on its own (warm = more
    attention), then coloured and alpha-blended. Returns (the image, upscaled so its shorter
    side is at least `min_side`, [(name, blended uint8 image)]).
    """
    # Imported here: every training worker imports this module, and only rank 0 draws (on the
    # last epoch); matplotlib costs a process half a second.
    from matplotlib import colormaps

    base = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    height, width = image.shape[:2]
    scale = max(1, int(np.ceil(min_side / min(height, width))))
    if scale > 1:
        base = F.interpolate(base, scale_factor=scale, mode="bilinear", align_corners=False)
    base_np = base[0].permute(1, 2, 0).clamp(0, 255).numpy()
    size = base_np.shape[:2]
    colour = colormaps[cmap]
    blended = []
    for name, value in maps.items():
        attn = torch.as_tensor(np.asarray(value, dtype=np.float32)).squeeze()
        if attn.ndim != 2:
            raise ValueError(f"attention map '{name}' must be 2-D per image, got {attn.shape}")
        attn = F.interpolate(attn[None, None], size=size, mode="bilinear", align_corners=False)
        attn = attn[0, 0].numpy()
        low, high = float(attn.min()), float(attn.max())
        attn = (attn - low) / (high - low) if high - low > 1e-12 else np.zeros_like(attn)
        heat = colour(attn)[..., :3] * 255.0
        mixed = (1 - alpha) * base_np + alpha * heat
        blended.append((name, mixed.round().clip(0, 255).astype(np.uint8)))
    return base_np.round().astype(np.uint8), blended


def overlay_strip(
    image: np.ndarray, maps: Mapping[str, torch.Tensor | np.ndarray], gap: int = 4
) -> np.ndarray:
    """The image beside each blended map, as one uint8 (H, W', 3) strip (for W&B)."""
    original, blended = attention_overlays(image, maps)
    tiles = [original, *(tile for _, tile in blended)]
    spacer = np.full((original.shape[0], gap, 3), 255, np.uint8)
    parts = []
    for i, tile in enumerate(tiles):
        parts.extend([spacer, tile] if i else [tile])
    return np.concatenate(parts, axis=1)


@dataclass(frozen=True)
class AttentionExample:
    """One test image with its attention maps and what the model said about it."""

    sample_id: str
    image: np.ndarray  # uint8 (H, W, 3), as the model saw it
    maps: dict[str, np.ndarray]  # name -> (h, w)
    label: int
    predicted: int
    confidence: float  # probability of the predicted class

    @property
    def correct(self) -> bool:
        return self.label == self.predicted


def compute_attention_examples(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: Sequence[int],
    predicted: Sequence[int],
    confidence: Sequence[float],
    ids: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    max_maps: int = MAX_MAPS_SHOWN,
) -> list[AttentionExample]:
    """Attention maps of normalised `images` (N, 3, H, W) in one no-grad pass."""
    maps = spatial_attention(model, images)
    names = pick_maps(list(maps), max_maps)
    pixels = denormalize(images, mean, std)
    return [
        AttentionExample(
            sample_id=str(ids[i]),
            image=pixels[i],
            maps={name: maps[name][i].numpy() for name in names},
            label=int(labels[i]),
            predicted=int(predicted[i]),
            confidence=float(confidence[i]),
        )
        for i in range(len(pixels))
    ]


def attention_examples(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: Sequence[int],
    class_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    limit: int = 8,
    ids: Sequence[str] | None = None,
) -> list[tuple[np.ndarray, str]]:
    """(overlay strip, caption) for the first `limit` images: what `WandbRun.log` takes as
    `images`; captions start with the sample id when `ids` are given. Empty for a model with
    no spatial attention (channel weights only): there is nothing to draw on the image.
    """
    images = images[:limit].detach().cpu()
    labels = [int(v) for v in labels[:limit]]
    ids = [str(i) for i in ids[:limit]] if ids is not None else [""] * len(labels)
    model_device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        probs = model(images.to(model_device)).float().softmax(1).cpu()
    model.train(was_training)
    confidence, predicted = probs.max(1)
    examples = compute_attention_examples(
        model,
        images.to(model_device),
        labels,
        predicted.tolist(),
        confidence.tolist(),
        ids,
        mean,
        std,
    )
    if not any(ex.maps for ex in examples):
        return []
    return [
        (
            overlay_strip(ex.image, ex.maps),
            f"{ex.sample_id + ': ' if ex.sample_id else ''}"
            f"true {class_names[ex.label]}, predicted {class_names[ex.predicted]} "
            f"({ex.confidence:.0%}); maps: {', '.join(ex.maps) or 'none'}",
        )
        for ex in examples
    ]
