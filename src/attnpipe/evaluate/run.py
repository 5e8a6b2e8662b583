"""`evaluate`: score `models/<name>/model.pt` on the test split, each sample exactly once.

Outputs under `reports/<name>/`: `metrics.json` (DVC metrics), `confusion.csv` (DVC confusion
plot: one row per test sample, actual and predicted class names), `per_class.csv`, the PNG
figures in `figures/` and the self-contained report page `index.html`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnpipe.config import Recipe
from attnpipe.data.loaders import ShardStream, make_loader, split_info
from attnpipe.data.shard_index import shard_location
from attnpipe.data.transforms import evaluation_size, evaluation_transform
from attnpipe.devices import require_cuda
from attnpipe.errors import AttnpipeError
from attnpipe.evaluate.results import FigureFile
from attnpipe.evaluate.scoring import (
    EXAMPLES_PER_CLASS,
    MAX_EXAMPLE_CLASSES,
    Candidate,
    SplitResult,
    score_share,
)
from attnpipe.joboutputs import in_job
from attnpipe.modelfile import load_model_file
from attnpipe.overlays import AttentionExample, compute_attention_examples
from attnpipe.paths import PipelinePaths

__all__ = ["EXAMPLES_PER_CLASS", "MAX_EXAMPLE_CLASSES", "SplitResult", "evaluate", "run_split"]


class EvaluateError(AttnpipeError, RuntimeError):
    pass


def evaluation_device(setting: str) -> torch.device:
    """`evaluate.device`: auto is the GPU when this machine has a usable one. Asking for cuda
    where CUDA cannot start is an error saying why, never a quiet CPU run."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return require_cuda("evaluate.device is cuda")


def run_split(
    model: torch.nn.Module,
    payload: dict[str, Any],
    recipe: Recipe,
    paths: PipelinePaths,
    split: str = "test",
    examples_per_class: int = 0,
    address: str | None = None,
) -> SplitResult:
    """Every sample of `split` scored exactly once (checked against the shard index): in this
    process on the model's device, or with `address` by the Ray cluster's workers.

    With `examples_per_class`, also keeps a few correct and wrong inputs (as uint8 pixels)
    for the attention overlays.
    """
    info = split_info(shard_location(recipe, paths), split)
    names = list(payload["class_names"])
    size = evaluation_size(recipe, payload["input_size"])
    if address:
        from attnpipe.evaluate.cluster import score_on_cluster

        scored = score_on_cluster(
            paths.model_file, recipe, info.shards, names, size, examples_per_class, address
        )
    else:
        device = next(model.parameters()).device
        scored = score_share(
            model,
            recipe,
            info.shards,
            names,
            size,
            device=device,
            examples_per_class=examples_per_class,
        )
    if not scored.ids:
        raise EvaluateError(f"the {split} split is empty: give prepare.splits.{split} a share")
    if len(scored.ids) != info.samples or len(set(scored.ids)) != len(scored.ids):
        raise EvaluateError(
            f"the {split} split should give each of its {info.samples} samples once; got "
            f"{len(scored.ids)} predictions for {len(set(scored.ids))} distinct ids"
        )
    return scored


def split_images(
    recipe: Recipe, paths: PipelinePaths, input_size: int, count: int, split: str = "test"
) -> torch.Tensor:
    """The first `count` images of `split` in shard order, transformed as evaluation does."""
    info = split_info(shard_location(recipe, paths), split)
    transform = evaluation_transform(recipe, input_size)
    stream = ShardStream(info.shards, rank=0, world_size=1, transform=transform, train=False)
    images: list[torch.Tensor] = []
    for batch, _, _ in make_loader(stream, count, workers=0):
        images.append(batch)
        if sum(len(b) for b in images) >= count:
            break
    if not images:
        return torch.zeros(0, 3, input_size, input_size)
    return torch.cat(images)[:count]


def evaluate(
    recipe: Recipe, paths: PipelinePaths, report: bool = True, address: str | None = None
) -> dict:
    """Compute and write the test metrics (and, with `report`, the figures and index.html).

    The model runs on `evaluate.device` (the GPU when there is one), or with `address` (or
    RAY_ADDRESS) on the Ray cluster's workers; the metrics are the same definitions as
    validation's, over every test sample once, wherever it runs. In a cluster job it scores
    the recipe's training run from `train.storage_path`, never an uploaded model.pt
    (`attnpipe.evaluate.stored_run`).
    """
    if not in_job():
        return evaluate_model(recipe, paths, report, address)
    from attnpipe.evaluate.stored_run import stored_run_inputs

    with stored_run_inputs(recipe, paths) as inputs:
        return evaluate_model(recipe, inputs, report, address)


def evaluate_model(
    recipe: Recipe, paths: PipelinePaths, report: bool = True, address: str | None = None
) -> dict:
    """`evaluate` of `paths.model_file` (whose training history is `paths.train_history`)."""
    address = address or os.environ.get("RAY_ADDRESS")
    model, payload = load_model_file(paths.model_file)
    if not address:  # on a cluster the driver (often a GPU-less head) only draws figures
        model = model.to(evaluation_device(recipe.evaluate.device))
    predictions = run_split(
        model, payload, recipe, paths, "test", EXAMPLES_PER_CLASS if report else 0, address
    )
    threshold = recipe.evaluate.threshold
    metrics: dict[str, Any] = {
        "test_samples": len(predictions.ids),
        **predictions.counts.metrics(),
    }
    if len(predictions.class_names) == 2:
        metrics["threshold"] = threshold
    per_class = predictions.counts.per_class(predictions.class_names)
    paths.reports.mkdir(parents=True, exist_ok=True)
    write_metrics_file(paths, metrics)
    write_confusion_rows(paths.confusion, predictions)
    write_per_class(paths.per_class, per_class)
    if report:
        from attnpipe.evaluate.report import write_report

        figures = write_figures(model, payload, recipe, paths, predictions, metrics)
        write_report(
            paths.report_html,
            pipeline=recipe.name,
            metrics=metrics,
            per_class=per_class,
            predictions=predictions,
            payload=payload,
            figures=figures,
            threshold=threshold,
            flip_tta=recipe.evaluate.flip_tta,
        )
        from attnpipe.evaluate.sharing import share_evaluation

        shared = share_evaluation(recipe, paths, payload, metrics, per_class, predictions, figures)
        if shared:  # `dvc exp show` then names this evaluation's W&B run too
            write_metrics_file(paths, metrics, wandb=shared)
    return metrics


def write_metrics_file(
    paths: PipelinePaths, metrics: dict[str, Any], wandb: dict[str, Any] | None = None
) -> None:
    """`metrics.json`: every test metric, and the W&B run that holds them; and its headline,
    `test_summary.json` (the stage's DVC metrics, a few columns of `dvc metrics show`; the
    training run's W&B id is in train_summary.json, this evaluation's in metrics.json)."""
    content: dict[str, Any] = {"test": json_safe(metrics)}
    if wandb:
        content["wandb"] = wandb
    paths.metrics.write_text(json.dumps(content, indent=2) + "\n")
    test = content["test"]
    summary = {f"test_{key}": test[key] for key in HEADLINE_METRICS if key in test}
    paths.test_summary.write_text(json.dumps(summary, indent=2) + "\n")


def json_safe(values: dict[str, Any]) -> dict[str, Any]:
    """NaN (e.g. ROC-AUC with one class present) is not JSON: write null instead."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in values.items()}


# The test metrics `dvc metrics show` lists (all of them are in metrics.json): accuracy, and
# the one that says more where classes are unbalanced (binary tasks: ROC-AUC).
HEADLINE_METRICS = ("accuracy", "macro_f1", "roc_auc")


def write_figures(
    model: torch.nn.Module,
    payload: dict[str, Any],
    recipe: Recipe,
    paths: PipelinePaths,
    predictions: SplitResult,
    metrics: dict[str, Any],
) -> list[FigureFile]:
    """Every PNG of the report into `reports/<name>/figures/` (replacing what was there)."""
    from attnpipe.evaluate import figures as fig
    from attnpipe.tracking import read_history

    if paths.figures.exists():
        shutil.rmtree(paths.figures)
    paths.figures.mkdir(parents=True)
    names = predictions.class_names
    threshold = recipe.evaluate.threshold
    written: list[FigureFile] = []

    def save(key: str, figure, title: str, caption: str) -> None:
        path = fig.save_png(figure, paths.figures / f"{key}.png")
        written.append(FigureFile(key, title, caption, path))

    counts = predictions.counts
    save(
        "confusion",
        fig.confusion_figure(counts.matrix, names),
        "Confusion matrix",
        "Test samples by true class (rows) and predicted class (columns); colour is the share "
        "of the true class, so the diagonal reads as per-class recall.",
    )
    history = read_history(paths.train_history)
    if history:
        save(
            "training_curves",
            fig.training_curves_figure(history, payload.get("epoch")),
            "Training curves",
            "Per epoch, from train_history.csv. The dashed line marks the best epoch on "
            f"validation ({recipe.train.monitor}), the weights this report evaluates.",
        )
    save(
        "calibration",
        fig.calibration_figure(counts.calibration_bins(), metrics["ece"]),
        "Calibration",
        "Accuracy of the test predictions against their confidence in 15 equal-width bins; "
        "bars below the diagonal are over-confident. ECE is the sample-weighted mean gap.",
    )
    labels, positive = counts.binary_scores()
    if len(names) == 2 and len(np.unique(labels)) == 2:
        save(
            "roc_pr",
            fig.roc_pr_figure(labels, positive, threshold),
            "ROC and precision-recall",
            f"Positive class: {names[1]}. The dot is the operating point at the recipe's "
            f"threshold {threshold:g} (evaluate.threshold).",
        )
    for chosen, key, title in (
        (predictions.correct_examples, "attention_correct", "Attention: correct predictions"),
        (predictions.wrong_examples, "attention_wrong", "Attention: the surest mistakes"),
    ):
        if not chosen:
            continue
        examples = _attention_examples(model, recipe, chosen)
        if not examples[0].maps:
            continue  # the model has no spatial attention maps to draw
        save(
            key,
            fig.attention_figure(examples, names, per_row=2),
            title,
            "Each test image (title: true → predicted class, confidence, id) beside its "
            "attention maps blended over it, shallow to deep; each map is normalised to its own "
            "range (warm = more attention).",
        )
    return written


def _attention_examples(
    model: torch.nn.Module, recipe: Recipe, chosen: list[Candidate]
) -> list[AttentionExample]:
    mean, std = recipe.augment.mean, recipe.augment.std
    pixels = torch.from_numpy(np.stack([c.pixels for c in chosen])).permute(0, 3, 1, 2)
    images = (pixels.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    examples: list[AttentionExample] = []
    for start in range(0, len(chosen), 16):
        part = chosen[start : start + 16]
        examples += compute_attention_examples(
            model,
            images[start : start + 16],
            [c.label for c in part],
            [c.predicted for c in part],
            [c.confidence for c in part],
            [c.sample_id for c in part],
            mean,
            std,
        )
    return examples


def write_confusion_rows(path: Path, predictions: SplitResult) -> None:
    """One row per sample, the shape DVC's confusion template reads (actual vs predicted)."""
    predicted = predictions.predicted
    names = predictions.class_names
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "actual", "predicted"])
        rows = sorted(zip(predictions.ids, predictions.labels, predicted, strict=True))
        for sample_id, actual, guess in rows:
            writer.writerow([sample_id, names[actual], names[guess]])


def write_per_class(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()})
