"""A Ray Tune sweep on CPU: it resumes after Ctrl-C, ASHA stops bad trials, reports list all."""

from __future__ import annotations

import csv
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from attnpipe.paths import PipelinePaths
from tests.train.trace import events, start_attnpipe
from tests.wandb_offline import exit_code, final_state, offline_runs, summary

# A short sweep: a few minutes on an idle 2-core machine, more when it is shared.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

# Three trials, the fewest that test both behaviours: two finish before the Ctrl-C (so the resume
# must skip them) and ASHA cuts the second (1e-6) against the bar the first (0.003) set.
LEARNING_RATES = [0.003, 1e-6, 0.002]


def _sweep_project(digits_project, root: Path, epochs: int, concurrent: int) -> PipelinePaths:
    _, built = digits_project
    shutil.copytree(built.root, root)
    recipe_path = root / "pipelines" / "digits.yaml"
    data = yaml.safe_load(recipe_path.read_text())
    data["tracking"] = {"wandb": {"mode": "offline", "project": "attnpipe"}}
    data["tune"] = {
        "space": {"train.optimizer.lr": {"type": "grid", "values": LEARNING_RATES}},
        "num_samples": 1,
        "max_concurrent_trials": concurrent,
        "epochs": epochs,
        "grace_period": 1,
        "reduction_factor": 2,
        "workers_per_trial": 1,
        "cpus_per_worker": 0.5,  # fractional: a trial takes half a core
    }
    recipe_path.write_text(yaml.safe_dump(data))
    return PipelinePaths(root, "digits")


def _read_trials(paths: PipelinePaths) -> list[dict]:
    with (paths.reports / "tune_trials.csv").open() as handle:
        return list(csv.DictReader(handle))


def _runs_started(trace: Path) -> Counter:
    return Counter(e["run"] for e in events(trace, 0) if e["event"] == "start")


def test_interrupted_sweep_resumes_then_asha_stops_bad_trials_and_reports_the_best(
    digits_project, tmp_path
):
    """3 trials of 2 epochs, one at a time: Ctrl-C in the third, resume, then the reports.

    One sweep for both behaviours (each trial is a TorchTrainer run, the slow part here). One
    trial at a time keeps ASHA's decision deterministic: the 1e-6 trial reaches each rung
    after the 0.003 trial has set the bar there. Two epochs give ASHA one rung (epoch 1, as
    grace_period 1 and reduction_factor 2 place it) below the last epoch: enough to cut a
    trial. (Tune does not save the scheduler's rungs with the experiment, so after the resume
    ASHA starts afresh.)
    """
    paths = _sweep_project(digits_project, tmp_path / "project", epochs=2, concurrent=1)
    trace = tmp_path / "trace"
    first = start_attnpipe(paths.root, "tune", trace)
    deadline = time.monotonic() + 600
    # One at a time: once a third trial has started, the first two have finished.
    while len(_runs_started(trace)) < 3:
        if first.poll() is not None or time.monotonic() > deadline:
            first.kill()
            pytest.fail(f"sweep ended early:\n{first.communicate()[0][-3000:]}")
        time.sleep(0.5)
    started_before = set(_runs_started(trace))
    first.send_signal(signal.SIGINT)
    output, _ = first.communicate(timeout=180)
    assert first.returncode == 130, output[-3000:]
    assert "stopping the sweep" in output
    assert not (paths.reports / "tune_trials.csv").exists()  # no report of a partial sweep

    second = start_attnpipe(paths.root, "tune", trace)
    output, _ = second.communicate(timeout=900)
    assert second.returncode == 0, output[-3000:]
    assert "resuming sweep" in output
    starts = _runs_started(trace)
    assert len(starts) == len(LEARNING_RATES)
    finished_before = [run for run in started_before if starts[run] == 1]
    assert len(finished_before) >= 2, starts  # finished trials were not run again
    assert all(starts[run] <= 2 for run in starts), starts  # the interrupted one restarted

    trials = _read_trials(paths)
    assert len(trials) == len(LEARNING_RATES)
    assert sorted(float(t["train.optimizer.lr"]) for t in trials) == sorted(LEARNING_RATES)
    assert all(t["status"] == "finished" for t in trials), trials
    by_lr = {float(t["train.optimizer.lr"]): t for t in trials}
    assert by_lr[1e-6]["stopped_early"] == "True", trials  # ASHA cut the hopeless trial
    assert by_lr[0.003]["stopped_early"] == "False", trials
    best_trial = max(trials, key=lambda t: float(t["best_val_accuracy"]))
    best_params = yaml.safe_load((paths.reports / "best_params.yaml").read_text())
    assert best_params == {"train.optimizer.lr": float(best_trial["train.optimizer.lr"])}
    assert float(best_trial["train.optimizer.lr"]) in (0.003, 0.002)  # not the 1e-6 trial
    _check_wandb_sweep(paths, trials, best_trial)


def _check_wandb_sweep(paths: PipelinePaths, trials: list[dict], best: dict) -> None:
    """On W&B (offline, read back from the run files as `wandb sync` would replay them): every
    trial a finished run of the sweep's group, ASHA's cut marked, the best tagged, and a
    summary run holding the trials table."""
    runs = offline_runs(paths.root / "wandb")
    trial_ids = {r.info.run_id for r in runs if r.info.job_type == "train"}
    assert len(trial_ids) == len(trials) == len(LEARNING_RATES)
    groups = {r.info.run_group for r in runs}
    assert len(groups) == 1, groups  # trials and the summary: one group, the sweep's
    by_trial = {t["trial_id"]: t for t in trials}
    for run_id in trial_ids:
        last = final_state(runs, run_id)
        assert exit_code(last.records) == 0, run_id  # finished, not crashed
        trial = next(t for key, t in by_trial.items() if run_id.endswith(key))
        tags = set(last.info.tags)
        assert ("stopped-early" in tags) == (trial["stopped_early"] == "True"), (run_id, tags)
        assert ("best" in tags) == (trial is best), (run_id, tags)
    [sweep] = [r for r in runs if r.info.job_type == "sweep"]
    values = summary(sweep.records)
    assert values["trials/nrows"] == len(LEARNING_RATES)
    assert values["best/trial_run"].endswith(best["trial_id"])
