"""`tune`: a Ray Tune sweep over recipe keys, each trial a TorchTrainer run, ASHA early stopping.

Outputs: `reports/<name>/tune_trials.csv` (every trial: its settings, last and best metric,
epochs run, stopped early or not) and `reports/<name>/best_params.yaml` (the best trial's
settings as dotted recipe keys), which `attnpipe train <name> --overrides` applies.

An interrupted sweep resumes when the same command runs again: the experiment is named after
the recipe and data, so Tune restores it and re-runs only unfinished trials, each continuing
from its last checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from attnpipe.config import ConfigError, Recipe, SearchDimension, apply_overrides
from attnpipe.data.shard import shard_location
from attnpipe.paths import PipelinePaths
from attnpipe.storage import join
from attnpipe.tracking import data_version
from attnpipe.train.stop import StopSignal, stop_signals

PARAMS_KEY = "params"


@dataclass(frozen=True)
class SweepResult:
    experiment: str
    trials: list[dict[str, Any]]
    best: dict[str, Any]


def search_space(space: dict[str, SearchDimension]) -> dict[str, Any]:
    from ray import tune

    samplers = {}
    for key, dim in space.items():
        if dim.type == "loguniform":
            samplers[key] = tune.loguniform(dim.low, dim.high)
        elif dim.type == "uniform":
            samplers[key] = tune.uniform(dim.low, dim.high)
        elif dim.type == "grid":
            samplers[key] = tune.grid_search(dim.values)
        else:
            samplers[key] = tune.choice(dim.values)
    return {PARAMS_KEY: samplers}


def experiment_name(recipe: Recipe, data_ver: str) -> str:
    fingerprint = recipe.fingerprint("model", "augment", "train", "tune")
    return (
        f"tune-{recipe.name}-{hashlib.sha256((fingerprint + data_ver).encode()).hexdigest()[:10]}"
    )


def trial_recipe(recipe: Recipe, params: dict[str, Any]) -> Recipe:
    """The base recipe with a trial's settings and the sweep's per-trial resources."""
    sweep = recipe.tune
    overrides = {
        **params,
        "train.workers": sweep.workers_per_trial,
        "train.cpus_per_worker": sweep.cpus_per_worker,
        "train.gpus_per_worker": sweep.gpus_per_worker,
        "train.epochs": sweep.epochs or recipe.train.epochs,
        "train.monitor": sweep.metric,
        "train.early_stopping_patience": None,  # ASHA decides when to stop
    }
    return apply_overrides(recipe, overrides, origin="tune trial")


def run_trial(config: dict[str, Any], base: dict[str, Any], paths: dict[str, str]) -> None:
    """One trial (runs as a Tune trainable): fit a TorchTrainer, reporting each epoch to Tune."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from attnpipe.train.launch import build_loop_config, resolve_use_gpu
    from attnpipe.train.loop import train_loop_per_worker

    recipe = trial_recipe(Recipe.model_validate(base), config[PARAMS_KEY])
    project = PipelinePaths(Path(paths["root"]), recipe.name)
    context = tune.get_context()
    loop_config = build_loop_config(recipe, project)
    trial = context.get_trial_id()
    # One W&B run per trial, grouped under the sweep.
    loop_config.update(
        run_name=f"{paths['experiment']}-{trial}",
        wandb_run_id=f"{paths['experiment']}-{trial}",
        wandb_group=paths["experiment"],
    )
    use_gpu = resolve_use_gpu(recipe.train.use_gpu)
    resources = {"CPU": recipe.train.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = recipe.train.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=recipe.train.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=f"{paths['experiment']}-{trial}",
            storage_path=paths["storage"],
            failure_config=FailureConfig(max_failures=recipe.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()],
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    trainer.fit()


def tune(recipe: Recipe, paths: PipelinePaths, address: str | None = None) -> SweepResult:
    """Run (or resume) the sweep of `recipe.tune` and write its reports."""
    if not recipe.tune.space:
        raise ConfigError(
            f"pipelines/{recipe.name}.yaml has no tune.space: add the keys to search, e.g. "
            "tune: {space: {train.optimizer.lr: {type: loguniform, low: 0.001, high: 0.1}}}"
        )
    from attnpipe.train.launch import configure_ray_environment, connect_ray

    configure_ray_environment()
    import ray
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    sweep = recipe.tune
    data_ver = data_version(paths.root, recipe.name, shard_location(recipe, paths))
    name = experiment_name(recipe, data_ver)
    # A folder or a URL (s3://...): kept a string, since Path would mangle "s3://".
    storage = recipe.train.storage_path or str(paths.tune_storage.resolve())
    trial_paths = {
        "root": str(paths.root.resolve()),
        "experiment": name,
        "storage": join(storage, "trials"),
    }
    trainable = ray_tune.with_parameters(
        run_trial, base=recipe.model_dump(mode="json"), paths=trial_paths
    )
    # The trial's own process only waits on its TorchTrainer: the workers hold the CPUs
    # (Tune refuses a request of zero, hence a token share).
    trainable = ray_tune.with_resources(trainable, {"cpu": 0.01})
    max_epochs = sweep.epochs or recipe.train.epochs

    started_here = connect_ray(address)
    try:
        experiment_path = join(storage, name)
        if ray_tune.Tuner.can_restore(experiment_path):
            print(f"resuming sweep '{name}': finished trials are not run again")
            tuner = ray_tune.Tuner.restore(
                experiment_path, trainable=trainable, resume_unfinished=True, restart_errored=True
            )
        else:
            tuner = ray_tune.Tuner(
                trainable,
                param_space=search_space(sweep.space),
                tune_config=ray_tune.TuneConfig(
                    metric=sweep.metric,
                    mode=sweep.mode,
                    num_samples=sweep.num_samples,
                    # The limit goes to the generator: Tune ignores TuneConfig's
                    # max_concurrent_trials when a BasicVariantGenerator is passed in.
                    search_alg=BasicVariantGenerator(
                        random_state=sweep.seed, max_concurrent=sweep.max_concurrent_trials or 0
                    ),
                    scheduler=ASHAScheduler(
                        time_attr="epoch",
                        max_t=max_epochs,
                        grace_period=sweep.grace_period,
                        reduction_factor=sweep.reduction_factor,
                    ),
                ),
                run_config=ray_tune.RunConfig(name=name, storage_path=storage),
            )
        with _stop_signals_end_the_sweep_gracefully() as interrupted:
            grid = tuner.fit()
    finally:
        if started_here:
            ray.shutdown()

    expected = sweep.num_samples * math.prod(
        len(dim.values or []) for dim in sweep.space.values() if dim.type == "grid"
    )
    if interrupted.received or grid.num_terminated + grid.num_errors < expected:
        # Tune saved the experiment and returned (the running trials marked as errors, which a
        # resume restarts): pass the stop on rather than report a partial sweep.
        raise KeyboardInterrupt(f"sweep '{name}' stopped before all {expected} trials ended")
    trials = summarise(grid, sweep.metric, sweep.mode, max_epochs)
    write_trials(paths, trials)  # first: it holds each trial's error if none succeeded
    best = pick_best(trials, sweep.mode)
    write_best_params(paths, best)
    return SweepResult(name, trials, best)


@contextmanager
def _stop_signals_end_the_sweep_gracefully() -> Iterator[StopSignal]:
    """Ctrl-C or SIGTERM: ask Tune to save the experiment and stop (SIGUSR1), and remember it.

    Tune's own Ctrl-C handler stops the sweep but leaves no trace of the interruption: the
    running trials come back as errors, indistinguishable from a sweep that ended. A second
    signal stops at once.
    """

    def ask_tune() -> None:
        if signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
            raise KeyboardInterrupt("stopped before Tune was listening")
        print("stopping the sweep: saving its state (press Ctrl-C again to stop at once)")
        os.kill(os.getpid(), signal.SIGUSR1)

    disable = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        with stop_signals(ask_tune) as signalled:
            yield signalled
    finally:
        if disable is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = disable


def summarise(grid: Any, metric: str, mode: str, max_epochs: int) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        values = [] if history is None or metric not in history else history[metric].tolist()
        epochs = int(result.metrics.get("epoch", 0)) if result.metrics else 0
        best_value = (max if mode == "max" else min)(values) if values else math.nan
        rows.append(
            {
                "trial_id": (result.metrics or {}).get("trial_id", Path(result.path).name),
                **{k: v for k, v in result.config[PARAMS_KEY].items()},
                f"last_{metric}": values[-1] if values else math.nan,
                f"best_{metric}": best_value,
                "epochs": epochs,
                "stopped_early": bool(result.error is None and epochs < max_epochs),
                "status": "error" if result.error else "finished",
                "error": str(result.error).splitlines()[0] if result.error else "",
            }
        )
    return sorted(rows, key=lambda r: r["trial_id"])


def pick_best(trials: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """The finished trial with the best metric (errored and metric-less trials never win)."""
    metric_key = next(k for k in trials[0] if k.startswith("best_"))
    finished = [t for t in trials if t["status"] == "finished" and t[metric_key] == t[metric_key]]
    if not finished:
        raise RuntimeError(f"no trial reported {metric_key[5:]}: see tune_trials.csv for errors")
    return (max if mode == "max" else min)(finished, key=lambda t: t[metric_key])


def write_trials(paths: PipelinePaths, trials: list[dict[str, Any]]) -> None:
    paths.reports.mkdir(parents=True, exist_ok=True)
    with (paths.reports / "tune_trials.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(trials[0]))
        writer.writeheader()
        writer.writerows(trials)


def write_best_params(paths: PipelinePaths, best: dict[str, Any]) -> None:
    params = {k: _plain(v) for k, v in best.items() if "." in k}
    header = (
        f"# Best trial {best['trial_id']} of the sweep; apply with:\n"
        f"#   attnpipe train {paths.name} --overrides {paths.reports / 'best_params.yaml'}\n"
    )
    (paths.reports / "best_params.yaml").write_text(header + yaml.safe_dump(params))


def _plain(value: Any) -> Any:
    """numpy scalars -> Python values, so the YAML stays readable."""
    return json.loads(json.dumps(value, default=lambda v: v.item()))
