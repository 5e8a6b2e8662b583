"""A training run's name and where its artefacts live in `train.storage_path`.

Shared by train (which writes them) and evaluate (which, inside a cluster job, scores the run
that train made from the same recipe, data and code, without importing the trainer):

    <storage>/<run name>/                Ray Train's run folder (checkpoint_*/ ...)
    <storage>/<run name>/best/epoch<k>.pt the best epoch's weights (train/checkpoint.py)
    <storage>/<run name>/best/model.pt    the finished run's model file (what models/<name>/
                                          model.pt holds), written by train when the storage
                                          is explicit, read by evaluate in a job
    <storage>/<run name>/best/train_history.csv  its history (the report's training curves)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from attnpipe.codeversion import code_version
from attnpipe.config import Recipe
from attnpipe.data.shard_index import shard_location
from attnpipe.paths import PipelinePaths
from attnpipe.storage import join
from attnpipe.tracking import data_version

RUN_MODEL_FILE = "model.pt"
RUN_HISTORY_FILE = "train_history.csv"


def run_name(recipe: Recipe, data_ver: str, code_ver: str) -> str:
    """`<pipeline>-<10 hex>`: stable for a given recipe (its weight-shaping keys), data and
    training code, so a relaunch resumes the run and a change to any of them starts a new one."""
    fingerprint = recipe.weights_fingerprint()
    short = hashlib.sha256(f"{fingerprint}{data_ver}{code_ver}".encode()).hexdigest()[:10]
    return f"{recipe.name}-{short}"


def current_run_name(recipe: Recipe, paths: PipelinePaths) -> str:
    """The run `attnpipe train` makes (or resumes) for this recipe, data and code now."""
    shards = shard_location(recipe, paths)
    return run_name(recipe, data_version(paths.root, recipe.name, shards), code_version("train"))


def best_weights_dir(storage: str | Path, run: str) -> str:
    """Beside the run's checkpoint folders, outside Ray's: `num_to_keep` never deletes it."""
    return join(storage, run, "best")


def run_model_location(storage: str | Path, run: str) -> str:
    return join(best_weights_dir(storage, run), RUN_MODEL_FILE)


def run_history_location(storage: str | Path, run: str) -> str:
    return join(best_weights_dir(storage, run), RUN_HISTORY_FILE)
