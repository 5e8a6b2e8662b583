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

from attnpipe.codeversion import code_version
from attnpipe.config import ConfigError, Recipe, SearchDimension, apply_overrides
from attnpipe.data.shard_index import shard_location
from attnpipe.errors import AttnpipeError
from attnpipe.paths import PipelinePaths
from attnpipe.raycluster import configure_ray_environment
from attnpipe.storage import join
from attnpipe.tracking import WandbRun, close_runs, data_version
from attnpipe.train.cluster import training_cluster, trial_shape
from attnpipe.train.stop import StopSignal, stop_signals

PARAMS_KEY = "params"


class TuneError(AttnpipeError, RuntimeError):
    """The sweep ended without a usable result; the message says where to look."""


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


def experiment_name(recipe: Recipe, data_ver: str, code_ver: str) -> str:
    fingerprint = recipe.fingerprint("model", "augment", "train", "tune")
    digest = hashlib.sha256((fingerprint + data_ver + code_ver).encode()).hexdigest()[:10]
    return f"tune-{recipe.name}-{digest}"


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
        # Tune takes every report as a result of the trial: reports stay one per epoch.
        "train.checkpoint_every": None,
    }
    return apply_overrides(recipe, overrides, origin="tune trial")


def run_trial(config: dict[str, Any], base: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One trial (runs as a Tune trainable): fit a TorchTrainer, reporting each epoch to Tune.

    `sweep` carries what the driver decided once for every trial: the project root, the
    experiment name, where trials keep checkpoints and whether they use GPUs.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from attnpipe.train.launch import build_loop_config, build_trainer

    recipe = trial_recipe(Recipe.model_validate(base), config[PARAMS_KEY])
    trial = tune.get_context().get_trial_id()
    name = f"{sweep['experiment']}-{trial}"
    # One W&B run per trial (id: trial_run_id), grouped under the sweep.
    loop = build_loop_config(recipe, PipelinePaths(Path(sweep["root"]), recipe.name))
    loop = loop.with_changes(
        run_name=name,
        wandb_run_id=trial_run_id(sweep["experiment"], trial),
        wandb_group=sweep["experiment"],
        use_gpu=sweep["use_gpu"],
    )
    trainer = build_trainer(
        loop, sweep["storage"], checkpoints_to_keep=1, callbacks=[TuneReportCallback()]
    )
    trainer.fit()


def trial_run_id(experiment: str, trial_id: str) -> str:
    return f"{experiment}-{trial_id}"


def tune(recipe: Recipe, paths: PipelinePaths, address: str | None = None) -> SweepResult:
    """Run (or resume) the sweep of `recipe.tune` and write its reports."""
    if not recipe.tune.space:
        raise ConfigError(
            f"pipelines/{recipe.name}.yaml has no tune.space: add the keys to search, e.g. "
            "tune: {space: {train.optimizer.lr: {type: loguniform, low: 0.001, high: 0.1}}}"
        )
    configure_ray_environment()
    sweep = recipe.tune
    data_ver = data_version(paths.root, recipe.name, shard_location(recipe, paths))
    name = experiment_name(recipe, data_ver, code_version("tune"))
    # A folder or a URL (s3://...): kept a string, since Path would mangle "s3://".
    storage = recipe.train.storage_path or str(paths.tune_storage.resolve())
    one_trial = trial_recipe(recipe, {}).train
    # Decided once, from the cluster: every trial trains where `train` would.
    with training_cluster(one_trial, address, shape=trial_shape(one_trial)) as plan:
        trial_settings = {
            "root": str(paths.root.resolve()),
            "experiment": name,
            "storage": join(storage, "trials"),
            "use_gpu": plan.use_gpu,
        }
        tuner = build_tuner(recipe, name, storage, trial_settings)
        with _stop_signals_end_the_sweep_gracefully() as interrupted:
            grid = tuner.fit()

    expected = sweep.num_samples * math.prod(
        len(dim.values or []) for dim in sweep.space.values() if dim.type == "grid"
    )
    if interrupted.received or grid.num_terminated + grid.num_errors < expected:
        # Tune saved the experiment and returned (the running trials marked as errors, which a
        # resume restarts): pass the stop on rather than report a partial sweep.
        raise KeyboardInterrupt(f"sweep '{name}' stopped before all {expected} trials ended")
    trials = summarise(grid, sweep.metric, sweep.mode, sweep.epochs or recipe.train.epochs)
    write_trials(paths, trials)  # first: it holds each trial's error if none succeeded
    best = pick_best(trials, sweep.mode)
    write_best_params(paths, best)
    share_sweep(recipe, paths, name, trials, best)
    return SweepResult(name, trials, best)


def build_tuner(recipe: Recipe, name: str, storage: str, trial_settings: dict[str, Any]) -> Any:
    """A new Tuner for the sweep, or the saved one restored (finished trials are kept)."""
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    sweep = recipe.tune
    trainable = ray_tune.with_parameters(
        run_trial, base=recipe.model_dump(mode="json"), sweep=trial_settings
    )
    # The trial's own process only waits on its TorchTrainer: the workers hold the CPUs
    # (Tune refuses a request of zero, hence a token share).
    trainable = ray_tune.with_resources(trainable, {"cpu": 0.01})
    experiment_path = join(storage, name)
    if ray_tune.Tuner.can_restore(experiment_path):
        print(f"resuming sweep '{name}': finished trials are not run again")
        return ray_tune.Tuner.restore(
            experiment_path, trainable=trainable, resume_unfinished=True, restart_errored=True
        )
    return ray_tune.Tuner(
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
                max_t=sweep.epochs or recipe.train.epochs,
                grace_period=sweep.grace_period,
                reduction_factor=sweep.reduction_factor,
            ),
        ),
        run_config=ray_tune.RunConfig(name=name, storage_path=storage),
    )


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
        raise TuneError(f"no trial reported {metric_key[5:]}: see tune_trials.csv for errors")
    return (max if mode == "max" else min)(finished, key=lambda t: t[metric_key])


def share_sweep(
    recipe: Recipe,
    paths: PipelinePaths,
    experiment: str,
    trials: list[dict[str, Any]],
    best: dict[str, Any],
) -> None:
    """The sweep on W&B, once every trial ended: every trial's run is closed as finished (Tune
    ends a trial by killing its workers, at ASHA's cut and at its last report alike, so no trial
    finishes its own run and W&B would call it crashed), those ASHA cut tagged "stopped-early",
    the best tagged "best", and one run of job type "sweep" holds the trials table."""
    config = recipe.tracking.wandb
    if config.mode == "disabled":
        return
    metric = recipe.tune.metric
    closing: dict[str, dict[str, Any]] = {}
    for trial in trials:
        tags = ["stopped-early"] if trial["stopped_early"] else []
        if trial["trial_id"] == best["trial_id"]:
            tags.append("best")
        summary = {"epochs": trial["epochs"], f"best/{metric}": trial[f"best_{metric}"]}
        closing[trial_run_id(experiment, trial["trial_id"])] = {"tags": tags, "summary": summary}
    close_runs(config, paths.wandb_parent, experiment, closing)
    summary = WandbRun.start(
        config,
        run_id=f"{experiment}-summary",
        name=f"{experiment}-summary",
        directory=paths.wandb_parent,
        run_config={"tune": recipe.tune.model_dump(mode="json"), "pipeline": recipe.name},
        group=experiment,
        job_type="sweep",
    )
    summary.log_table("trials", [{k: _plain(v) for k, v in t.items()} for t in trials])
    summary.summary(
        {
            "best/trial_run": trial_run_id(experiment, best["trial_id"]),
            f"best/{metric}": _plain(best[f"best_{metric}"]),
            **{f"best/{k}": _plain(v) for k, v in best.items() if "." in k},
        }
    )
    summary.finish()


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
