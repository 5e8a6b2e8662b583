"""`train`: launch the per-worker loop under Ray Train and turn its last checkpoint into outputs.

A run is named after the pipeline and a fingerprint of everything that shapes the weights
(model, augmentation, training settings, data version, and the version of the code that
trains), not of how it executes (`TrainConfig.EXECUTION_KEYS`: loader processes, CPUs per
rank, failure budget, checkpoints kept, where they are stored). Launching the same run again,
after a crash, a Ctrl-C or a preempted node, or with only those changed, continues from its
latest checkpoint; changing anything else starts a new run beside it.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnpipe import runs
from attnpipe.capacity import WorkerPlan
from attnpipe.codeversion import code_version
from attnpipe.config import Recipe, resolve_pretrained
from attnpipe.data.shard_index import ShardError, read_index, shard_location
from attnpipe.errors import AttnpipeError
from attnpipe.paths import PipelinePaths
from attnpipe.raycluster import configure_ray_environment, environment_variable
from attnpipe.storage import upload_file as storage_upload
from attnpipe.tracking import (
    ExperimentIdentity,
    data_version,
    experiment_identity,
    git_commit,
    import_wandb_runs,
    wandb_run_folder,
    write_history,
)
from attnpipe.train.checkpoint import TrainingState, read_checkpoint, write_best_model
from attnpipe.train.cluster import training_cluster
from attnpipe.train.finished import already_finished, finished_state
from attnpipe.train.loop_config import LoopConfig
from attnpipe.train.stop import create_stop_flag, run_stoppable

# W&B run ids longer than this are refused.
WANDB_ID_MAX = 64
# Seconds an elastic run's worker group may wait for its placement before it is sized again.
ELASTIC_START_S = 30


class TrainError(AttnpipeError, RuntimeError):
    pass


@dataclass(frozen=True)
class TrainResult:
    run_name: str
    model_file: Path
    best_epoch: int
    best_metrics: dict[str, float]
    epochs_run: int
    resumed_from: list[int]


def run_identity(
    recipe: Recipe,
    data_ver: str,
    code_ver: str,
    experiment: ExperimentIdentity | None = None,
) -> tuple[str, str]:
    """(Ray run name, W&B run id): stable for a given recipe, data and code, so resumes find
    them; a change to any of them is a new run (nothing stale is resumed). The W&B id also
    holds the DVC experiment's name: two experiments never share a W&B run, even when their
    training settings are equal (their checkpoints are the same run, found again)."""
    run_name = runs.run_name(recipe, data_ver, code_ver)
    suffix = experiment.run_id_suffix() if experiment else ""
    return run_name, (run_name + suffix)[:WANDB_ID_MAX]


def build_loop_config(recipe: Recipe, paths: PipelinePaths) -> LoopConfig:
    """Everything a worker needs; devices and stop flag are added once Ray is connected."""
    shards = shard_location(recipe, paths)
    try:
        read_index(shards)
    except ShardError as missing:
        raise TrainError(f"{missing}; run `attnpipe shard {recipe.name}`") from None
    data_ver = data_version(paths.root, recipe.name, shards)
    code_ver = code_version("train")
    experiment = experiment_identity()
    run_name, wandb_id = run_identity(recipe, data_ver, code_ver, experiment)
    storage = recipe.train.storage_path or str(paths.checkpoints.resolve())
    return LoopConfig(
        # The run's name comes from the recipe as written; the workers get absolute paths.
        recipe=resolve_pretrained(recipe, paths.root, origin=f"pipelines/{recipe.name}.yaml"),
        shards=shards,
        run_name=run_name,
        best_weights_dir=best_weights_dir(storage, run_name),
        wandb_run_id=wandb_id,
        wandb_parent=str(paths.wandb_parent.resolve()),
        run_config={
            **recipe.model_dump(mode="json"),
            "git_commit": git_commit(paths.root),
            "code_version": code_ver,
            "data_version": data_ver,
            "run_name": run_name,
            "dvc_experiment": experiment.as_config(),
        },
        experiment_name=experiment.name,
        wandb_tags=tuple(experiment.tags),
        # Explicit storage may be on other machines than this one: keep an offline W&B run
        # there (an online one is on wandb.ai already).
        wandb_export=(
            recipe.train.storage_path if recipe.tracking.wandb.mode == "offline" else None
        ),
    )


def best_weights_dir(storage: str, run_name: str) -> str:
    """Beside the run's checkpoint folders, outside Ray's: `num_to_keep` never deletes it."""
    return runs.best_weights_dir(storage, run_name)


def build_trainer(
    loop: LoopConfig,
    storage: str,
    checkpoints_to_keep: int,
    callbacks: Sequence[Any] = (),
) -> Any:
    """The one place a `TorchTrainer` is built, for `train` and for every `tune` trial."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from attnpipe.train.cluster import worker_resources
    from attnpipe.train.entry import train_loop_per_worker

    train_cfg = loop.recipe.train
    loop = loop.with_changes(best_weights_dir=best_weights_dir(storage, loop.run_name))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop},
        scaling_config=ScalingConfig(
            # A (min, max) pair is elastic: Ray Train starts with what is there up to max,
            # restarts with fewer when nodes leave (down to min, from the last checkpoint) and
            # with more when they come back.
            num_workers=loop.workers if loop.workers is not None else train_cfg.workers,
            use_gpu=loop.use_gpu,
            resources_per_worker=worker_resources(train_cfg, loop.use_gpu),
        ),
        run_config=RunConfig(
            name=loop.run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=train_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=checkpoints_to_keep),
            callbacks=list(callbacks),
            # INFO echoes every report and checkpoint; our epoch line says it once.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def train(recipe: Recipe, paths: PipelinePaths, address: str | None = None) -> TrainResult:
    """Train `recipe` on its shards with Ray Train; write `model.pt` and the history CSV."""
    train_cfg = recipe.train
    configure_ray_environment()
    loop = build_loop_config(recipe, paths)
    storage = train_cfg.storage_path or str(paths.checkpoints.resolve())
    ended = finished_state(loop.best_weights_dir, loop.wandb_run_id, train_cfg)
    if ended is not None:  # launched again: nothing to train, no cluster to start
        reason = already_finished(ended, train_cfg.early_stopping_patience)
        print(f"training run '{loop.run_name}': {reason}", flush=True)
        if loop.wandb_export:
            import_wandb_runs(loop.wandb_export, paths.wandb_parent)
        return write_outputs(recipe, paths, loop, ended)
    if recipe.model.pretrained == "imagenet" and not (address or os.environ.get("RAY_ADDRESS")):
        # Once, before the local workers start: they would all download it at the same time.
        from attnpipe.models import fetch_imagenet_weights

        fetch_imagenet_weights(recipe.model.name)

    def announce(plan: WorkerPlan) -> None:
        # Before the GPU probe, which may refuse the run: what was planned is said either way.
        print(
            f"training run '{loop.run_name}' ({plan.describe()}); "
            f"checkpoints in {storage}/{loop.run_name}",
            flush=True,
        )

    # The elastic run's short placement wait starts after the GPU probe, which waits as long
    # as a fixed-size run for the autoscaler to boot a GPU node (capacity.node_start_wait_s).
    with (
        training_cluster(train_cfg, address, announce) as plan,
        placement_wait(elastic=isinstance(train_cfg.workers, tuple)),
    ):
        stop_name = f"attnpipe-stop-{loop.run_name}-{uuid.uuid4().hex[:8]}"
        loop = loop.with_changes(use_gpu=plan.use_gpu, workers=plan.workers, stop_name=stop_name)
        stop_flag = create_stop_flag(stop_name)
        trainer = build_trainer(loop, storage, train_cfg.checkpoints_to_keep)
        result, stop_requested = run_stoppable(
            lambda: fit_or_explain(trainer), request_stop=lambda: stop_flag.request.remote()
        )
        if result.checkpoint is None:
            raise TrainError(f"run '{loop.run_name}' finished without a checkpoint")
        with result.checkpoint.as_directory() as folder:
            saved = read_checkpoint(Path(folder))
    if loop.wandb_export:
        import_wandb_runs(loop.wandb_export, paths.wandb_parent)
    state = TrainingState.from_dict(saved["state"])
    if stop_requested and not state.finished(train_cfg):
        raise KeyboardInterrupt(f"run '{loop.run_name}' stopped after epoch {state.epoch}")
    return write_outputs(recipe, paths, loop, state)


@contextmanager
def placement_wait(elastic: bool) -> Iterator[None]:
    """An elastic run waits ELASTIC_START_S for each worker group's placement, for the run's
    length. Ray Train sizes each (re)start by the nodes its resource coordinator saw last
    (refreshed every 20 s), so a restart right after a node loss may still ask for the lost
    node's rank; after this wait it tries again with a fresh view. Set, not defaulted: the
    fixed-size runs' long wait (for GPU nodes an autoscaler is still starting), inherited from
    a parent process or an earlier run in this one, would hold a shrunken run for 10 minutes."""
    wait = str(ELASTIC_START_S) if elastic else None
    with environment_variable("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", wait):
        yield


def fit_or_explain(trainer: Any) -> Any:
    """`trainer.fit()`; a worker's expected failure (e.g. a GPU it cannot use, an empty split)
    becomes one TrainError line instead of Ray's wrapped traceback."""
    from ray.train import TrainingFailedError

    try:
        return trainer.fit()
    except TrainingFailedError as failed:
        cause = expected_cause(failed)
        if cause is None:
            raise
        raise TrainError(f"training failed: {' '.join(str(cause).split())}") from failed


def expected_cause(error: BaseException) -> Exception | None:
    """The expected error (bad input or environment) behind a Ray Train failure, if any."""
    from attnpipe.models import ModelError

    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, AttnpipeError | ModelError):
            return current
        pending.extend(getattr(current, "worker_failures", {}).values())
        pending += [getattr(current, "cause", None), current.__cause__, current.__context__]
        pending.append(getattr(current, "controller_failure", None))
    return None


def write_outputs(
    recipe: Recipe, paths: PipelinePaths, loop: LoopConfig, state: TrainingState
) -> TrainResult:
    """`model.pt` from the best epoch's weights, and the history CSV."""
    classes = read_index(loop.shards)["classes"]
    best_metrics = write_best_model(paths.model_file, loop, state, classes)
    write_history(paths.train_history, state.history)
    write_train_metrics(paths, loop, state, best_metrics)
    if recipe.train.storage_path:
        publish_run_model(recipe.train.storage_path, loop.run_name, paths)
    return TrainResult(
        loop.run_name,
        paths.model_file,
        state.best_epoch,
        best_metrics,
        len(state.history),
        list(state.resumed_from),
    )


def publish_run_model(storage: str, run_name: str, paths: PipelinePaths) -> None:
    """`model.pt` and the history beside the run's best weights (`attnpipe.runs`): a cluster
    job's evaluate scores the run from there, never from a model.pt of the project folder."""
    storage_upload(paths.model_file, runs.run_model_location(storage, run_name))
    storage_upload(paths.train_history, runs.run_history_location(storage, run_name))


def write_train_metrics(
    paths: PipelinePaths, loop: LoopConfig, state: TrainingState, best: dict[str, float]
) -> dict[str, Any]:
    """`reports/<name>/train.json`, the run's record (best epoch, its validation metrics, the
    W&B run), and its headline, `train_summary.json`, the train stage's DVC metrics: the best
    epoch, the monitored metric and the W&B run id, which `dvc exp show` lists beside the test
    headline. Only a few columns, so that `dvc metrics show` fits a terminal."""
    metrics = {
        "best_epoch": state.best_epoch,
        "epochs_run": len(state.history),
        "best": best,
        "run_name": loop.run_name,
        "experiment": loop.run_config.get("dvc_experiment", {}),
        "wandb": wandb_reference(paths, loop),
    }
    paths.train_metrics.parent.mkdir(parents=True, exist_ok=True)
    paths.train_metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    monitor = loop.recipe.train.monitor
    summary = {"best_epoch": state.best_epoch, monitor: best.get(monitor)}
    if metrics["wandb"]:
        summary["wandb_run"] = metrics["wandb"]["run_id"]
    paths.train_summary.write_text(json.dumps(summary, indent=2) + "\n")
    return metrics


def wandb_reference(paths: PipelinePaths, loop: LoopConfig) -> dict[str, Any] | None:
    """Where the run's W&B run is: its id and path (entity/project/id) and, when it was kept
    on this machine, its folder relative to the workspace (the `wandb sync` argument)."""
    settings = loop.recipe.tracking.wandb
    if settings.mode == "disabled":
        return None
    project = "/".join(part for part in (settings.entity, settings.project) if part)
    folder = wandb_run_folder(paths.wandb_parent, loop.wandb_run_id)
    return {
        "run_id": loop.wandb_run_id,
        "run_path": f"{project}/{loop.wandb_run_id}",
        "folder": str(folder.relative_to(paths.wandb_parent)) if folder else None,
    }
