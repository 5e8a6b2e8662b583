"""Figures for the report: confusion, curves, calibration, ROC/PR and the attention grid.

Everything draws on `matplotlib.figure.Figure` objects with the Agg canvas: no pyplot, no
global backend switch, no display needed. The attention overlay itself (an image with a map
blended over it) is defined once in `attnpipe.overlays`, shared with the W&B images of the
training loop; `attention_figure` lays overlays out for the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from attnpipe.overlays import AttentionExample, attention_overlays

INK = "#1f2937"
MUTED = "#6b7280"
GRID = "#e5e7eb"
PALETTE = ["#2563eb", "#f97316", "#16a34a", "#9333ea", "#dc2626", "#0891b2"]
GOOD, BAD = "#15803d", "#b91c1c"


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


def calibration_figure(binned: tuple[np.ndarray, np.ndarray, np.ndarray], ece: float):
    """Reliability diagram (accuracy against confidence per bin) over a confidence histogram;
    `binned` is (mean confidence, accuracy, count) per bin (`MetricCounts.calibration_bins`)."""
    mean_conf, accuracy, counts = binned
    bins = len(counts)
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
    # Imported here: scikit-learn (with SciPy) costs every `evaluate` 2 s of start-up, and only
    # binary tasks draw these curves.
    from sklearn import metrics as skm

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
