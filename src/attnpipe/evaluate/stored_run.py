"""Evaluate inside a cluster job: score the training run's model from `train.storage_path`.

A job's working directory is the uploaded project folder, and models/<name>/model.pt (a DVC
output, ignored by git) is never in it; nor should an uploaded copy be trusted to match the
recipe. The job therefore scores the run that `attnpipe train` makes for this very recipe,
data and code (`attnpipe.runs.current_run_name`), from the model file train leaves beside the
run's best weights: `<storage>/<run>/best/model.pt`, with its `train_history.csv` for the
report's training curves. Both are downloaded into a private temporary folder (the working
directory may be shared with other jobs of the same upload).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from attnpipe import storage
from attnpipe.config import Recipe
from attnpipe.errors import AttnpipeError
from attnpipe.paths import PipelinePaths
from attnpipe.runs import current_run_name, run_history_location, run_model_location


class StoredRunError(AttnpipeError, FileNotFoundError):
    """The training run's model is not on storage; the message says how to make it."""


@dataclass(frozen=True)
class StoredRunPaths(PipelinePaths):
    """The project's paths, but the model file and training history read from `scratch`
    (where the stored run's copies were downloaded); every output goes where it always does."""

    scratch: Path

    @property
    def model_file(self) -> Path:
        return self.scratch / "model.pt"

    @property
    def train_history(self) -> Path:
        return self.scratch / "train_history.csv"


@contextmanager
def stored_run_inputs(recipe: Recipe, paths: PipelinePaths) -> Iterator[StoredRunPaths]:
    """`paths` with model.pt and train_history.csv of the recipe's training run on storage."""
    storage_path = recipe.train.storage_path
    if not storage_path:
        raise StoredRunError(
            f"evaluate in a cluster job scores the training run on train.storage_path, which "
            f"pipelines/{recipe.name}.yaml does not set: set it to shared storage "
            "(s3://BUCKET/checkpoints) and train there first"
        )
    run = current_run_name(recipe, paths)
    model = run_model_location(storage_path, run)
    if not storage.exists(model):
        raise StoredRunError(
            f"training run '{run}' has no model at {model}: train this recipe on the cluster "
            f"first (`attnpipe submit {recipe.name} --stage train`, with the same --set and "
            "--overrides as this evaluation); a run that finished before model files were kept "
            "there writes it when submitted again, without training"
        )
    with tempfile.TemporaryDirectory(prefix="attnpipe-run-") as scratch:
        inputs = StoredRunPaths(paths.root, paths.name, Path(scratch))
        storage.download_file(model, inputs.model_file)
        history = run_history_location(storage_path, run)
        if storage.exists(history):
            storage.download_file(history, inputs.train_history)
        print(f"evaluating training run '{run}' from {model}", flush=True)
        yield inputs
