"""The evaluation on W&B: a run of job type "evaluate" in the group of the training run that
made model.pt (see `attnpipe.tracking.follow_up_run`), written by evaluate's own process only."""

from __future__ import annotations

from typing import Any

import numpy as np

from attnpipe import tracking
from attnpipe.config import Recipe
from attnpipe.data.shard_index import shard_location
from attnpipe.evaluate.results import FigureFile
from attnpipe.evaluate.scoring import SplitResult
from attnpipe.paths import PipelinePaths

# Rows of the most-confident-mistakes table, and images of kept mistakes, sent to W&B.
WANDB_MISTAKES = 20
WANDB_MISTAKE_IMAGES = 16


def share_evaluation(
    recipe: Recipe,
    paths: PipelinePaths,
    payload: dict[str, Any],
    metrics: dict[str, Any],
    per_class: list[dict],
    predictions: SplitResult,
    figures: list[FigureFile],
) -> dict[str, Any] | None:
    """Test metrics, confusion matrix, tables, mistakes, figures and the report page on W&B;
    returns where the run is (`tracking.run_reference`), None when tracking is off."""
    config = recipe.tracking.wandb
    if config.mode == "disabled":
        return None
    predicted = predictions.predicted
    names = predictions.class_names
    scored = tracking.EvaluationLog(
        pipeline=recipe.name,
        metrics=metrics,
        class_names=names,
        labels=[int(x) for x in predictions.labels],
        predicted=[int(x) for x in predicted],
        per_class=per_class,
        mistakes=confident_mistakes(predictions, predicted, WANDB_MISTAKES),
        report=paths.report_html,
        figures={f.key: (f.path, f.caption) for f in figures},
        mistake_images=[
            (
                c.pixels,
                f"{c.sample_id}: {names[c.label]} → {names[c.predicted]} ({c.confidence:.0%})",
            )
            for c in sorted(
                (c for c in predictions.candidates if c.label != c.predicted),
                key=lambda c: -c.confidence,
            )[:WANDB_MISTAKE_IMAGES]
        ],
        aliases=tracking.artifact_aliases(
            None, payload.get("git_commit"), tracking.experiment_name()
        ),
    )
    shards = str(shard_location(recipe, paths))
    run = tracking.follow_up_run(
        config,
        paths.wandb_parent,
        payload,
        "evaluate",
        {"evaluate": recipe.evaluate.model_dump(mode="json"), "pipeline": recipe.name},
    )
    run.use_data(recipe.name, shards, tracking.data_version(paths.root, recipe.name, shards))
    run.log_evaluation(scored)
    reference = tracking.run_reference(run, config, paths.wandb_parent)
    tracking.finish_and_say(run)
    return reference


def confident_mistakes(
    predictions: SplitResult, predicted: np.ndarray, count: int
) -> list[dict[str, Any]]:
    """The `count` misclassified test samples the model was surest about, surest first."""
    wrong = np.flatnonzero(predicted != predictions.labels)
    confidence = predictions.confidence[wrong]
    names = predictions.class_names
    return [
        {
            "id": predictions.ids[i],
            "true": names[predictions.labels[i]],
            "predicted": names[predicted[i]],
            "p_predicted": float(predictions.confidence[i]),
            "p_true": float(predictions.true_prob[i]),
        }
        for i in wrong[np.argsort(-confidence, kind="stable")][:count]
    ]
