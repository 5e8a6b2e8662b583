"""Figures for the report, and the attention overlays the training loop logs to W&B.

Everything draws on `matplotlib.figure.Figure` objects with the Agg canvas: no pyplot, no
global backend switch, no display needed. The attention overlay is defined once here
(`attention_overlays`); `overlay_strip` and `attention_examples` package it for W&B
(the `images` of `WandbRun.log`), `attention_figure` lays it out for the report.

Shapes: images are uint8 (H, W, 3); attention maps as the models return them, N x 1 x h x w
(spatial maps: Residual Attention soft masks, grid / LTPA attention). Channel weights (N x C,
the streamlined ResNets) have no spatial layout and are not drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn import metrics as skm

from attnpipe.metrics import calibration_bins

ATTENTION_CMAP = "turbo"
OVERLAY_ALPHA = 0.55
# Overlays of small inputs (32 x 32) are upscaled so the blended map reads as a smooth field.
OVERLAY_MIN_SIDE = 128
MAX_MAPS_SHOWN = 4

INK = "#1f2937"
MUTED = "#6b7280"
GRID = "#e5e7eb"
PALETTE = ["#2563eb", "#f97316", "#16a34a", "#9333ea", "#dc2626", "#0891b2"]
GOOD, BAD = "#15803d", "#b91c1c"


# --------------------------------------------------------------------------- attention
def spatial_maps(maps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The maps with a spatial layout (N x 1 x h x w or N x h x w), as N x h x w float."""
    kept = {}
    for name, value in maps.items():
        if value.ndim == 4 and value.shape[1] == 1:
            value = value[:, 0]
        if value.ndim == 3 and min(value.shape[-2:]) > 1:
            kept[name] = value.detach().float().cpu()
    return kept


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
    from attnpipe.evaluate.inference import denormalize

    was_training = model.training
    model.eval()
    with torch.no_grad():
        maps = spatial_maps(model.attention_maps(images))
    model.train(was_training)
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


def attention_figure(
    examples: Sequence[AttentionExample], class_names: Sequence[str], per_row: int = 2
) -> Figure:
    """A grid of `per_row` examples per row, each the input image then its overlays."""
    rows = [examples[i : i + per_row] for i in range(0, len(examples), per_row)]
    map_names = list(examples[0].maps) if examples else []
    tiles = 1 + len(map_names)
    tile_in = 1.3
    fig = Figure(
        figsize=(per_row * tiles * tile_in + (per_row - 1) * 0.4, len(rows) * (tile_in + 0.62))
    )
    outer = fig.add_gridspec(len(rows), per_row, wspace=0.1, hspace=0.5)
    for r, row in enumerate(rows):
        for c, ex in enumerate(row):
            inner = outer[r, c].subgridspec(1, tiles, wspace=0.04)
            original, blended = attention_overlays(ex.image, ex.maps)
            for t, (name, tile) in enumerate([("input", original), *blended]):
                ax = fig.add_subplot(inner[0, t])
                ax.imshow(tile, interpolation="bilinear")
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if t == 0:
                    verdict = GOOD if ex.correct else BAD
                    ax.set_title(
                        f"{_short(class_names[ex.label])} → {_short(class_names[ex.predicted])}"
                        f"\n{ex.confidence:.0%}",
                        fontsize=8.5,
                        color=verdict,
                        pad=3,
                    )
                    ax.set_xlabel(_short(ex.sample_id, 20), fontsize=7.5, color=MUTED, labelpad=2)
                elif r == 0:
                    ax.set_title(name, fontsize=8.5, color=MUTED, pad=3)
    return fig


def _short(text: str, limit: int = 18) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- metrics figures
def _style(ax) -> None:
    ax.grid(True, color=GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#9ca3af")
    ax.tick_params(colors=INK, labelsize=8.5)
    ax.xaxis.label.set_color(INK)
    ax.yaxis.label.set_color(INK)
    ax.title.set_color(INK)


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Counts, coloured by the share of each true class (row): the diagonal is recall."""
    n = len(class_names)
    side = min(max(4.8, 0.5 * n + 2.2), 14)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j] == 0 and i != j:
                    continue
                ax.text(
                    j,
                    i,
                    str(matrix[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8 if n <= 15 else 6,
                    color="white" if share[i, j] > 0.55 else INK,
                )
    labels = [_short(name, 16) for name in class_names]
    if n <= 40:
        ax.set_xticks(
            range(n), labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center"
        )
        ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.tick_params(labelsize=8.5, colors=INK, length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label("share of the true class", fontsize=8.5, color=INK)
    bar.ax.tick_params(labelsize=8, colors=INK)
    bar.outline.set_visible(False)
    return fig


def training_curves_figure(history: Sequence[Mapping[str, str | float]], best_epoch: int | None):
    """Losses, validation metrics and learning rate per epoch from train_history.csv rows."""
    epochs = np.array([float(row["epoch"]) for row in history])

    def column(key: str) -> np.ndarray | None:
        if not history or key not in history[0]:
            return None
        values = [row.get(key) for row in history]
        if all(v in (None, "") for v in values):
            return None
        return np.array([float(v) if v not in (None, "") else np.nan for v in values])

    has_lr = column("lr") is not None
    fig = Figure(figsize=(13.5 if has_lr else 10, 3.7))
    axes = fig.subplots(1, 3 if has_lr else 2, gridspec_kw={"wspace": 0.28})
    loss_ax, metric_ax = axes[0], axes[1]
    for key, label, colour in (
        ("train_loss", "train loss", PALETTE[0]),
        ("val_loss", "validation loss", PALETTE[1]),
    ):
        values = column(key)
        if values is not None:
            loss_ax.plot(
                epochs, values, marker="o", markersize=3, lw=1.8, color=colour, label=label
            )
    losses = [line.get_ydata() for line in loss_ax.lines]
    finite = np.concatenate([v[np.isfinite(v)] for v in losses]) if losses else np.array([])
    if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 20:
        loss_ax.set_yscale("log")  # one early spike would flatten every later epoch
    loss_ax.set_title(
        "loss" + (" (log scale)" if loss_ax.get_yscale() == "log" else ""), fontsize=10, loc="left"
    )
    metric_keys = [
        ("val_accuracy", "accuracy"),
        ("val_balanced_accuracy", "balanced accuracy"),
        ("val_macro_f1", "macro F1"),
        ("val_roc_auc", "ROC-AUC"),
        ("val_pr_auc", "PR-AUC"),
    ]
    shown = [(k, label) for k, label in metric_keys if column(k) is not None]
    for (key, label), colour in zip(shown, PALETTE, strict=False):
        metric_ax.plot(
            epochs, column(key), marker="o", markersize=3, lw=1.8, color=colour, label=label
        )
    metric_ax.set_title("validation metrics", fontsize=10, loc="left")
    if has_lr:
        lr_ax = axes[2]
        lr_ax.plot(epochs, column("lr"), lw=1.8, color=PALETTE[3])
        lr_ax.set_title("learning rate (end of epoch)", fontsize=10, loc="left")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in axes:
        _style(ax)
        ax.set_xlabel("epoch")
        if len(epochs) and epochs.max() <= 30:
            ax.set_xticks(epochs[:: max(1, int(np.ceil(len(epochs) / 15)))])
        if best_epoch:
            ax.axvline(best_epoch, color=MUTED, lw=1, ls="--")
    if best_epoch:
        metric_ax.annotate(
            f"best epoch {best_epoch}",
            xy=(best_epoch, 0.02),
            xycoords=("data", "axes fraction"),
            xytext=(-4, 0),
            textcoords="offset points",
            ha="right",
            fontsize=8,
            color=MUTED,
        )
    for ax in (loss_ax, metric_ax):
        if ax.lines:
            ax.legend(fontsize=8, frameon=False)
    return fig


def calibration_figure(labels: np.ndarray, probs: np.ndarray, ece: float, bins: int = 15):
    """Reliability diagram (accuracy against confidence per bin) over a confidence histogram."""
    mean_conf, accuracy, counts = calibration_bins(labels, probs, bins)
    edges = np.linspace(0, 1, bins + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, 1 / bins
    fig = Figure(figsize=(5.2, 5.0))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = counts > 0
    top.bar(
        centres[filled], accuracy[filled], width=width * 0.92, color=PALETTE[0], label="accuracy"
    )
    gap_low = np.minimum(accuracy, mean_conf)[filled]
    top.bar(
        centres[filled],
        np.abs(accuracy - mean_conf)[filled],
        bottom=gap_low,
        width=width * 0.92,
        facecolor="none",
        edgecolor=PALETTE[4],
        hatch="////",
        linewidth=1,
        label="gap to mean confidence",
    )
    top.plot([0, 1], [0, 1], ls="--", color=MUTED, lw=1, label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"reliability (ECE {ece:.3f})", fontsize=10, loc="left", pad=24)
    top.legend(
        fontsize=8,
        frameon=False,
        loc="lower left",
        bbox_to_anchor=(0, 1.0),
        ncol=3,
        handlelength=1.5,
        columnspacing=1.2,
        borderaxespad=0.2,
    )
    bottom.bar(centres, counts, width=width * 0.92, color="#94a3b8")
    bottom.set_ylabel("samples")
    bottom.set_xlabel("confidence of the predicted class")
    bottom.set_xlim(0, 1)
    for ax in (top, bottom):
        _style(ax)
    return fig


def roc_pr_figure(labels: np.ndarray, positive: np.ndarray, threshold: float) -> Figure:
    """Binary tasks: ROC and precision-recall curves, the recipe's threshold marked on both."""
    fig = Figure(figsize=(10, 4.2))
    roc_ax, pr_ax = fig.subplots(1, 2, gridspec_kw={"wspace": 0.28})
    fpr, tpr, _ = skm.roc_curve(labels, positive)
    precision, recall, _ = skm.precision_recall_curve(labels, positive)
    auc = skm.roc_auc_score(labels, positive)
    ap = skm.average_precision_score(labels, positive)
    predicted = positive >= threshold
    tp = int(np.sum(predicted & (labels == 1)))
    fp = int(np.sum(predicted & (labels == 0)))
    fn = int(np.sum(~predicted & (labels == 1)))
    tn = int(np.sum(~predicted & (labels == 0)))
    op_tpr = tp / (tp + fn) if tp + fn else np.nan
    op_fpr = fp / (fp + tn) if fp + tn else np.nan
    op_precision = tp / (tp + fp) if tp + fp else np.nan
    roc_ax.plot(fpr, tpr, color=PALETTE[0], lw=2, label=f"ROC (AUC {auc:.3f})")
    roc_ax.plot([0, 1], [0, 1], ls="--", color=MUTED, lw=1)
    roc_ax.plot(op_fpr, op_tpr, "o", color=PALETTE[4], label=f"threshold {threshold:g}")
    roc_ax.set_xlabel("false positive rate (1 - specificity)")
    roc_ax.set_ylabel("true positive rate (sensitivity)")
    roc_ax.set_title("ROC curve", fontsize=10, loc="left")
    pr_ax.step(recall, precision, where="post", color=PALETTE[2], lw=2, label=f"AP {ap:.3f}")
    pr_ax.axhline(float(np.mean(labels)), ls="--", color=MUTED, lw=1, label="prevalence")
    pr_ax.plot(op_tpr, op_precision, "o", color=PALETTE[4], label=f"threshold {threshold:g}")
    pr_ax.set_xlabel("recall (sensitivity)")
    pr_ax.set_ylabel("precision")
    pr_ax.set_title("precision-recall curve", fontsize=10, loc="left")
    for ax in (roc_ax, pr_ax):
        _style(ax)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.legend(fontsize=8, frameon=False, loc="lower right" if ax is roc_ax else "lower left")
    return fig


def save_png(fig: Figure, path: Path, dpi: int = 100) -> Path:
    """Write `fig` as PNG (no timestamps in the file: same figure, same bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white", metadata={"Software": None})
    return path
