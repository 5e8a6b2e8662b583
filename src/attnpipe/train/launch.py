"""`train`: launch the per-worker loop under Ray Train and turn its last checkpoint into outputs.

A run is named after the pipeline and a fingerprint of everything that shapes the weights
(model, augmentation, training settings, data version). Launching the same run again, after a
crash, a Ctrl-C or a preempted node, continues from its latest checkpoint; changing any of
those settings starts a new run beside it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnpipe.config import Recipe
from attnpipe.data.shard import ShardError, read_index, shard_location
from attnpipe.errors import AttnpipeError
from attnpipe.paths import PipelinePaths
from attnpipe.tracking import data_version, git_commit, write_history
from attnpipe.train.stop import create_stop_flag, run_stoppable

MODEL_FORMAT_VERSION = 1
# Set to 1 to start the Ray dashboard with a private local cluster.
DASHBOARD_ENV = "ATTNPIPE_RAY_DASHBOARD"


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


def run_identity(recipe: Recipe, data_ver: str) -> tuple[str, str]:
    """(Ray run name, W&B run id): stable for a given recipe and data, so resumes find them."""
    fingerprint = recipe.fingerprint("model", "augment", "train")
    short = hashlib.sha256(f"{fingerprint}{data_ver}".encode()).hexdigest()[:10]
    return f"{recipe.name}-{short}", f"{recipe.name}-{short}"


def configure_ray_environment() -> None:
    """Settings Ray reads from the environment, defaulted before it is imported."""
    # Under `uv run`, Ray would otherwise package the working directory (data/ included) and
    # start every worker through `uv run`; the workers share this environment already.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # Ray's 60 s is too short for GPU nodes that autoscale in, or for a loaded machine.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")


def connect_ray(address: str | None, cpus_needed: int = 1) -> bool:
    """Join `address` (or RAY_ADDRESS), else start a private local cluster.

    Returns whether a connection was made here (and so must be shut down here).
    """
    import ray

    if ray.is_initialized():
        return False
    sigterm = signal.getsignal(signal.SIGTERM)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local": a private cluster, never one that happens to run on this machine already
        # (`ray start`, a test's). Its one node is never drained, so Ray Train's preemption
        # watcher (an extra actor process per run) has nothing to watch.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(
            address="local",
            num_cpus=max(os.cpu_count() or 1, cpus_needed),
            # The dashboard's processes poll and report all the time: on a small machine they
            # take CPU from the workers. Opt in with ATTNPIPE_RAY_DASHBOARD=1.
            include_dashboard=os.environ.get(DASHBOARD_ENV, "0") == "1",
            log_to_driver=True,
            configure_logging=False,
        )
    # Ray's core installs a fatal-signal handler that aborts on SIGTERM; put ours back so a
    # `kill` unwinds (shutting Ray down, keeping checkpoints) like Ctrl-C does.
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)
    return True


def build_loop_config(recipe: Recipe, paths: PipelinePaths) -> dict[str, Any]:
    """Everything a worker needs, as plain JSON-able values (it crosses process boundaries)."""
    shards = shard_location(recipe, paths)
    try:
        read_index(shards)
    except ShardError as missing:
        raise TrainError(f"{missing}; run `attnpipe shard {recipe.name}`") from None
    data_ver = data_version(paths.root, recipe.name, shards)
    run_name, wandb_id = run_identity(recipe, data_ver)
    return {
        "recipe": recipe.model_dump(mode="json"),
        "shards": shards,
        "run_name": run_name,
        "wandb_run_id": wandb_id,
        "wandb_parent": str(paths.wandb_parent.resolve()),
        "run_config": {
            **recipe.model_dump(mode="json"),
            "git_commit": git_commit(paths.root),
            "data_version": data_ver,
            "run_name": run_name,
        },
    }


def resolve_use_gpu(setting: Any) -> bool:
    if setting == "auto":
        return torch.cuda.is_available()
    return bool(setting)


def train(
    recipe: Recipe,
    paths: PipelinePaths,
    address: str | None = None,
) -> TrainResult:
    """Train `recipe` on its shards with Ray Train; write `model.pt` and the history CSV."""
    configure_ray_environment()
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from attnpipe.train.loop import CHECKPOINT_FILE, TrainingState, train_loop_per_worker

    train_cfg = recipe.train
    loop_config = build_loop_config(recipe, paths)
    run_name = loop_config["run_name"]
    storage = train_cfg.storage_path or str(paths.checkpoints.resolve())
    use_gpu = resolve_use_gpu(train_cfg.use_gpu)
    resources = {"CPU": train_cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = train_cfg.gpus_per_worker

    started_here = connect_ray(address, int(train_cfg.workers * train_cfg.cpus_per_worker))
    try:
        loop_config["stop_name"] = f"attnpipe-stop-{run_name}-{uuid.uuid4().hex[:8]}"
        stop_flag = create_stop_flag(loop_config["stop_name"])
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(
                num_workers=train_cfg.workers, use_gpu=use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name=run_name,
                storage_path=storage,
                failure_config=FailureConfig(max_failures=train_cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=train_cfg.checkpoints_to_keep),
                # INFO echoes every report and checkpoint; our epoch line says it once.
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        print(
            f"training run '{run_name}' ({train_cfg.workers} worker(s), "
            f"{'GPU' if use_gpu else 'CPU'}); checkpoints in {storage}/{run_name}"
        )
        result, stop_requested = run_stoppable(
            trainer.fit, request_stop=lambda: stop_flag.request.remote()
        )
        if result.checkpoint is None:
            raise TrainError(f"run '{run_name}' finished without a checkpoint")
        with result.checkpoint.as_directory() as folder:
            saved = torch.load(
                Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True
            )
    finally:
        if started_here:
            ray.shutdown()

    state = saved["state"]
    if stop_requested and not TrainingState.from_dict(state).finished(train_cfg):
        raise KeyboardInterrupt(f"run '{run_name}' stopped after epoch {state['epoch']}")
    classes = read_index(loop_config["shards"])["classes"]
    best_row = next(r for r in state["history"] if r["epoch"] == state["best_epoch"])
    best_metrics = {k: v for k, v in best_row.items() if k.startswith("val_")}
    write_model_file(
        paths.model_file,
        recipe=recipe,
        state_dict=state["best_weights"],
        class_names=classes,
        epoch=state["best_epoch"],
        metrics=best_metrics,
        git=loop_config["run_config"]["git_commit"],
        data_ver=loop_config["run_config"]["data_version"],
        run_name=run_name,
    )
    write_history(paths.train_history, state["history"])
    return TrainResult(
        run_name,
        paths.model_file,
        state["best_epoch"],
        best_metrics,
        len(state["history"]),
        list(state["resumed_from"]),
    )


def write_model_file(
    path: Path,
    recipe: Recipe,
    state_dict: dict[str, torch.Tensor],
    class_names: list[str],
    epoch: int,
    metrics: dict[str, float],
    git: str,
    data_ver: str,
    run_name: str,
) -> None:
    """The deployable artefact: plain tensors and values, loadable with weights_only=True."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": MODEL_FORMAT_VERSION,
        "model_name": recipe.model.name,
        "model_kwargs": dict(recipe.model.kwargs),
        "num_classes": len(class_names),
        "input_size": recipe.model.input_size,
        "class_names": list(class_names),
        "mean": list(recipe.augment.mean),
        "std": list(recipe.augment.std),
        "state_dict": state_dict,
        "recipe": recipe.model_dump(mode="json"),
        "epoch": epoch,
        "metrics": metrics,
        "git_commit": git,
        "data_version": data_ver,
        "run_name": run_name,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # never leave a half-written model.pt behind


def load_model_file(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the network of a `model.pt` without Ray; returns (model in eval mode, payload)."""
    from attnpipe.models import create_model

    if not path.is_file():
        raise TrainError(f"{path} is missing: run `attnpipe train` first")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model(
        payload["model_name"], num_classes=payload["num_classes"], **payload["model_kwargs"]
    )
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload
