"""A run survives a dead worker, a Ctrl-C and a `kill`, losing at most the current epoch."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from attnpipe.paths import PipelinePaths
from attnpipe.train.launch import train
from tests.train.trace import (
    events,
    recorded_epoch,
    start_attnpipe,
    wait_for_epoch,
    wait_for_recorded_epoch,
)
from tests.wandb_offline import history_rows, read_records, run_ids

# Real Ray / DVC runs: minutes on an idle 2-core machine; the allowance covers a busy one.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]


def _copy_project(digits_project, destination: Path) -> PipelinePaths:
    _, built = digits_project
    shutil.copytree(built.root, destination, dirs_exist_ok=True)
    return PipelinePaths(destination, "digits")


def test_worker_killed_in_epoch_2_restarts_from_epoch_1(digits_project, tmp_path, monkeypatch):
    """Both workers die at the end of epoch 2, after validating it and before its checkpoint
    (an injected fault point, not a timed kill); Ray restarts the group from epoch 1."""
    recipe, _ = digits_project
    paths = _copy_project(digits_project, tmp_path / "project")
    trace = tmp_path / "trace"
    monkeypatch.setenv("ATTNPIPE_TRACE_DIR", str(trace))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("ATTNPIPE_FAULT_AT", "validated:2")
    monkeypatch.setenv("ATTNPIPE_FAULT_DIR", str(tmp_path / "faults"))

    result = train(recipe, paths)

    assert sorted(p.name for p in (tmp_path / "faults").iterdir()) == [
        "fired-validated-2-rank0",
        "fired-validated-2-rank1",
    ]
    assert result.resumed_from == [1]  # restarted from the epoch-1 checkpoint ...
    assert result.epochs_run == recipe.train.epochs == 3  # ... and finished
    starts = [e for e in events(trace, 1) if e["event"] == "start"]
    assert [e["epoch"] for e in starts] == [0, 1]
    killed = next(e for e in events(trace, 1) if e["event"] == "epoch" and e["epoch"] == 2)
    assert starts[1]["pid"] != killed["pid"]
    assert paths.model_file.is_file()

    # W&B: the killed attempt's rank 0 died without finishing its run, yet its epoch is kept;
    # the restarted attempt continues the same run with the other two. (Row 1 is in the first
    # file once W&B has written it, within FLUSH_INTERVAL_S; otherwise the restarted attempt
    # logs it: either way every epoch once, in order.)
    runs = sorted((paths.root / "wandb").glob("offline-run-*/run-*.wandb"))
    records = [read_records(run) for run in runs]
    ids = [run_ids(r) for r in records]
    assert len(ids) == 2 and ids[0] == ids[1] and len(ids[0]) == 1
    logged = [[row["epoch"] for row in history_rows(r) if "epoch" in row] for r in records]
    assert [epoch for attempt in logged for epoch in attempt] == [1, 2, 3]
    assert logged[1][-2:] == [2, 3]
    assert any(key.startswith("val/attention_overlays/") for key in history_rows(records[1])[-1])


def test_killed_train_command_resumes_with_the_same_wandb_run(digits_project, tmp_path):
    """SIGTERM (what `kill`, schedulers and preemption send); Ctrl-C takes the same path."""
    paths = _copy_project(digits_project, tmp_path / "project")
    trace = tmp_path / "trace"
    first = start_attnpipe(paths.root, "train", trace, WANDB_MODE="offline")
    try:
        wait_for_epoch(trace, rank=0, epoch=2)
        wait_for_recorded_epoch(paths.checkpoints, 1)
    except TimeoutError:
        first.kill()
        pytest.fail(first.communicate()[0][-3000:])
    first.send_signal(signal.SIGTERM)
    output, _ = first.communicate(timeout=180)
    assert first.returncode == 130, output[-3000:]
    assert "stopping at the next step" in output
    assert "run the same command again to resume" in output
    assert not paths.model_file.exists()
    kept = recorded_epoch(paths.checkpoints)  # the workers stop within a few steps: 1 or 2
    assert kept in (1, 2), output[-3000:]

    second = start_attnpipe(paths.root, "train", tmp_path / "trace2", WANDB_MODE="offline")
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output[-3000:]
    assert f"resuming from the checkpoint of epoch {kept}" in output
    epochs_started = [e["epoch"] for e in events(tmp_path / "trace2", 0) if e["event"] == "epoch"]
    assert epochs_started == list(range(kept + 1, 4))  # only the unfinished epochs again
    assert paths.model_file.is_file()

    runs = sorted((paths.root / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2  # one per launch ...
    records = [read_records(run) for run in runs]
    ids = [run_ids(r) for r in records]
    assert ids[0] == ids[1] and len(ids[0]) == 1  # ... continuing one W&B run ...
    logged = [[row["epoch"] for row in history_rows(r) if "epoch" in row] for r in records]
    # ... and the stopped launch flushed its epochs before exiting: none is lost.
    assert logged == [list(range(1, kept + 1)), list(range(kept + 1, 4))]
