"""Queued DVC experiments run side by side: `dvc exp run --queue` twice, `dvc queue start -j 2`.

Real DVC (its celery queue workers, each experiment in a temporary copy of the workspace),
real Ray (a private cluster per experiment, one CPU each), W&B offline: nothing mocked. One
experiment changes only an evaluation setting, the other a training setting (one epoch, one
worker, so that it costs seconds).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.conftest import GIT_ID, ReproProject, run_in
from tests.wandb_offline import read_records, run_config

pytestmark = [pytest.mark.ray, pytest.mark.dvc, pytest.mark.timeout(1200)]

RECIPE = "pipelines/digits.yaml"
EXPERIMENTS = {
    "evalonly": [f"{RECIPE}:evaluate.batch_size=64"],
    "shorter": [f"{RECIPE}:train.epochs=1", f"{RECIPE}:train.workers=1"],
}
QUEUE_DEADLINE_S = 900
# Each experiment's private Ray cluster gets one of the machine's two cores.
SHARE = {"ATTNPIPE_RAY_CPUS": "1", "ATTNPIPE_RAY_DASHBOARD": "0"}


def _start_queue(root: Path, log: Path) -> None:
    """`dvc queue start -j 2`, its output to a file: the workers it spawns inherit its output,
    so reading it through a pipe would wait for them to exit."""
    env = {
        **os.environ,
        **GIT_ID,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "WANDB_MODE": "offline",
        **SHARE,
    }
    with log.open("w") as out:
        done = subprocess.run(
            ["dvc", "queue", "start", "-j", str(len(EXPERIMENTS))],
            cwd=root,
            env=env,
            stdout=out,
            stderr=out,
        )
    assert done.returncode == 0, log.read_text()[-2000:]


def _queue_states(root: Path) -> dict[str, str]:
    """Experiment name -> its state in `dvc queue status` (Queued, Running, Success, Failed)."""
    states = {}
    for line in run_in(root, "dvc", "queue", "status").splitlines():
        words = line.split()
        if len(words) >= 3 and words[1] in EXPERIMENTS:  # task, name, created, status
            states[words[1]] = words[-1]
    return states


def _worker_infos(root: Path) -> list[dict]:
    """What dvc-task knows of each queue worker `dvc queue start` spawned (one JSON file each,
    written atomically)."""
    return [
        json.loads(info.read_text()) for info in _celery_folder(root).glob("dvc-exp-worker-*.json")
    ]


def _celery_folder(root: Path) -> Path:
    return root / ".dvc" / "tmp" / "exps" / "celery"


def _worker_pids(root: Path) -> list[int]:
    return [int(info["pid"]) for info in _worker_infos(root) if info.get("pid")]


# Celery's line when a worker's task is over, success or not: DVC runs an experiment, collects
# it and cleans up in this one task, so after it nothing writes the experiment's info file.
TASK_OVER = re.compile(
    r"Task dvc\.repo\.experiments\.queue\.tasks\.run_exp\[[^\]]+\] (succeeded|raised)"
)


def _tasks_over(root: Path) -> int:
    logs = _celery_folder(root).glob("dvc-exp-worker-*.out")
    return sum(len(TASK_OVER.findall(log.read_text(errors="replace"))) for log in logs)


def _wait_for_queue(root: Path) -> dict[str, str]:
    """Wait until the workers say every experiment's task is over, then read `dvc queue status`
    once.

    Polling `dvc queue status` while experiments run races with DVC itself: an executor rewrites
    its info file in place, and a status read in between fails with a JSON error (it failed CI).
    The workers' own logs say when each task, collection and cleanup included, has ended; the
    workers themselves may idle on (`_stop_workers` ends them).
    """
    deadline = time.monotonic() + QUEUE_DEADLINE_S
    while time.monotonic() < deadline:
        if _tasks_over(root) >= len(EXPERIMENTS):
            return _queue_states(root)
        time.sleep(2)
    raise AssertionError(
        f"the queue did not finish in {QUEUE_DEADLINE_S} s: {_tasks_over(root)} task(s) over; "
        f"queue: {run_in(root, 'dvc', 'queue', 'status')}"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_workers(root: Path) -> None:
    """`dvc queue stop`, then wait for the workers (ours) to exit; kill them if they do not."""
    pids = _worker_pids(root)
    run_in(root, "dvc", "queue", "stop")
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in filter(_alive, pids):
        os.kill(pid, 9)


# Each stage's record: plain outputs kept in git, so in each experiment's commit.
RECORDS = ("reports/digits/train.json", "reports/digits/metrics.json")


def _experiments(root: Path) -> dict[str, dict]:
    """Experiment name -> {file: its data}: the DVC metrics `dvc exp show --json` lists (the
    stages' summaries), and the records read from the experiment's commit."""
    shown = json.loads(run_in(root, "dvc", "exp", "show", "--json", "--no-fetch"))
    found = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            revision = experiment["revs"][0]
            metrics = revision["data"]["metrics"]
            files = {path: item["data"] for path, item in metrics.items()}
            for record in RECORDS:
                text = run_in(root, "git", "show", f"{revision['rev']}:{record}")
                files[record] = json.loads(text)
            found[experiment["name"]] = files
    return found


def _run_record(folder: Path):
    records = read_records(next(folder.glob("run-*.wandb")))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    return run, run_config(records)


class Queued(NamedTuple):
    """The experiments' project after the queue ran both, and what it showed."""

    root: Path
    states: dict[str, str]  # `dvc queue status`
    logs: dict[str, str]  # `dvc queue logs <name>`
    runs_before: set[str]  # the training runs in the workspace before the queue
    shown: dict[str, dict]  # `_experiments`: each experiment's metrics and records


@pytest.fixture(scope="module")
def queued(repro_project: ReproProject, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("experiments") / "project"
    shutil.copytree(repro_project.root, root, symlinks=True)
    with (root / ".gitignore").open("a") as handle:
        handle.write("/models/*/checkpoints/\n")
    run_in(root, "git", "add", "-A")
    run_in(root, "git", "commit", "-q", "-m", "baseline: the pipeline built")
    runs_before = {p.name for p in (root / "models/digits/checkpoints").iterdir()}
    for name, settings in EXPERIMENTS.items():
        sets = [word for setting in settings for word in ("-S", setting)]
        run_in(root, "dvc", "exp", "run", "--queue", "-n", name, *sets)
    started = time.monotonic()
    try:
        _start_queue(root, tmp_path_factory.mktemp("queue") / "start.log")
        states = _wait_for_queue(root)
    finally:
        _stop_workers(root)
    print(f"both experiments ran in {time.monotonic() - started:.0f} s")
    logs = {name: run_in(root, "dvc", "queue", "logs", name) for name in EXPERIMENTS}
    # The README's table (shown with `pytest -s`).
    keep = "Experiment|best_epoch|val_accuracy|test_accuracy|wandb_run"
    wide = {"COLUMNS": "300"}
    print(run_in(root, "dvc", "exp", "show", "--drop", ".*", "--keep", keep, env=wide))
    return Queued(root, states, logs, runs_before, _experiments(root))


def test_both_queued_experiments_succeed_sharing_the_machine(queued):
    root, states, logs = queued.root, queued.states, queued.logs
    assert states == {"evalonly": "Success", "shorter": "Success"}, logs
    # The training experiment started its private Ray cluster with its share, not every core.
    assert "private Ray cluster on this machine with 1 CPU(s)" in logs["shorter"], logs["shorter"]
    assert not _worker_pids(root) or not any(_alive(pid) for pid in _worker_pids(root))


def test_the_evaluation_only_experiment_does_not_retrain(queued):
    root, logs, shown = queued.root, queued.logs, queued.shown
    assert "Running stage 'train@digits'" not in logs["evalonly"], logs["evalonly"]
    assert "Running stage 'evaluate@digits'" in logs["evalonly"]
    assert "Running stage 'train@digits'" in logs["shorter"]
    # Checkpoints live in the workspace: only the training experiment added a run there.
    runs_after = {p.name for p in (root / "models/digits/checkpoints").iterdir()}
    assert len(runs_after - queued.runs_before) == 1, (queued.runs_before, runs_after)
    baseline = json.loads((root / "reports/digits/train.json").read_text())
    assert shown["evalonly"]["reports/digits/train.json"]["run_name"] == baseline["run_name"]
    assert shown["shorter"]["reports/digits/train.json"]["run_name"] != baseline["run_name"]


def test_the_training_experiment_names_its_own_wandb_run_found_from_exp_show(queued):
    root, shown = queued.root, queued.shown
    train = shown["shorter"]["reports/digits/train.json"]
    # `dvc exp show` lists the train stage's headline beside the test's: the W&B run found there.
    summary = shown["shorter"]["reports/digits/train_summary.json"]
    assert summary["best_epoch"] == 1 and train["epochs_run"] == 1
    assert summary["val_accuracy"] == train["best"]["val_accuracy"] > 0
    test = shown["shorter"]["reports/digits/metrics.json"]["test"]
    assert shown["shorter"]["reports/digits/test_summary.json"]["test_accuracy"] == test["accuracy"]
    wandb_ref = train["wandb"]
    assert summary["wandb_run"] == wandb_ref["run_id"]
    assert wandb_ref["run_id"].endswith("-shorter")
    assert wandb_ref["run_path"] == f"attnpipe/{wandb_ref['run_id']}"
    # The offline run is in the workspace, not in DVC's deleted temporary copy.
    folder = root / wandb_ref["folder"]
    assert folder.is_dir() and folder.name.endswith(wandb_ref["run_id"])
    run, config = _run_record(folder)
    assert run.run_id == wandb_ref["run_id"]
    assert "shorter" in run.display_name
    assert "dvc-exp:shorter" in run.tags
    assert config["dvc_experiment"]["name"] == "shorter"
    baseline_rev = run_in(root, "git", "rev-parse", "HEAD").strip()
    assert config["dvc_experiment"]["baseline_rev"] == baseline_rev
    assert f"dvc-baseline:{baseline_rev[:10]}" in run.tags
    # Never the baseline's W&B run, whose id has no experiment in it.
    baseline = json.loads((root / "reports/digits/train.json").read_text())
    assert baseline["wandb"]["run_id"] != wandb_ref["run_id"]
    assert baseline["experiment"] == {"name": None, "baseline_rev": None}


def test_each_experiment_has_its_own_evaluation_run_naming_it(queued):
    """Evaluate runs in both experiments: `metrics.json` names its W&B run (job type evaluate,
    in the group of the training run that made the model), tagged with the experiment."""
    root, shown = queued.root, queued.shown
    baseline = json.loads((root / "reports/digits/metrics.json").read_text())
    seen = {baseline["wandb"]["run_id"]}
    for name in EXPERIMENTS:
        wandb_ref = shown[name]["reports/digits/metrics.json"]["wandb"]
        assert wandb_ref["run_id"] not in seen, (name, wandb_ref)  # never a shared run
        seen.add(wandb_ref["run_id"])
        folder = root / wandb_ref["folder"]
        assert folder.is_dir(), wandb_ref
        run, config = _run_record(folder)
        assert run.run_id == wandb_ref["run_id"] and run.job_type == "evaluate"
        assert f"dvc-exp:{name}" in run.tags and name in run.display_name
        assert config["dvc_experiment"]["name"] == name
        trained_by = shown[name]["reports/digits/train.json"]["wandb"]["run_id"]
        assert run.run_group == trained_by
