"""`evaluate`: score `models/<name>/model.pt` on the test split, each sample exactly once.

Outputs: `reports/<name>/metrics.json` (DVC metrics), `confusion.csv` (DVC confusion plot:
one row per test sample, actual and predicted class names), `per_class.csv`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attnpipe.config import Recipe
from attnpipe.data.loaders import ShardStream, build_transform, make_loader, split_info
from attnpipe.data.shard import shard_location
from attnpipe.metrics import classification_metrics, per_class_report, predict_classes, softmax
from attnpipe.paths import PipelinePaths
from attnpipe.train.launch import load_model_file


@dataclass(frozen=True)
class Predictions:
    ids: list[str]
    labels: np.ndarray  # N
    probs: np.ndarray  # N x C
    class_names: list[str]


def predict_split(recipe: Recipe, paths: PipelinePaths, split: str = "test") -> Predictions:
    """Run `model.pt` over every sample of `split` in this process, in shard order."""
    model, payload = load_model_file(paths.model_file)
    info = split_info(shard_location(recipe, paths), split)
    stream = ShardStream(
        urls=info.urls,
        rank=0,
        world_size=1,
        transform=build_transform(recipe.augment, payload["input_size"], train=False),
        train=False,
    )
    loader = make_loader(stream, recipe.evaluate.batch_size, workers=0)
    ids: list[str] = []
    labels, logits = [], []
    with torch.inference_mode():
        for images, batch_labels, batch_ids in loader:
            output = model(images)
            if recipe.evaluate.flip_tta:
                output = (output.softmax(1) + model(images.flip(-1)).softmax(1)).log()
            logits.append(output.float())
            labels.append(batch_labels)
            ids.extend(batch_ids)
    if not ids:
        raise RuntimeError(f"the {split} split is empty: give prepare.splits.{split} a share")
    return Predictions(
        ids=ids,
        labels=torch.cat(labels).numpy(),
        probs=softmax(torch.cat(logits).numpy()),
        class_names=payload["class_names"],
    )


def evaluate(recipe: Recipe, paths: PipelinePaths) -> dict:
    """Compute and write the test metrics; return them."""
    predictions = predict_split(recipe, paths, "test")
    threshold = recipe.evaluate.threshold
    metrics = classification_metrics(predictions.labels, predictions.probs, threshold)
    metrics = {"test_samples": len(predictions.ids), **metrics}
    paths.reports.mkdir(parents=True, exist_ok=True)
    paths.metrics.write_text(json.dumps({"test": metrics}, indent=2) + "\n")
    write_confusion_rows(paths.confusion, predictions, threshold)
    write_per_class(
        paths.reports / "per_class.csv",
        per_class_report(predictions.labels, predictions.probs, predictions.class_names, threshold),
    )
    return metrics


def write_confusion_rows(path: Path, predictions: Predictions, threshold: float) -> None:
    """One row per sample, the shape DVC's confusion template reads (actual vs predicted)."""
    predicted = predict_classes(predictions.probs, threshold)
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
