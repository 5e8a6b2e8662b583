"""A run survives dead workers, a Ctrl-C and a `kill`, losing at most the current epoch.

One scenario carries both faults (a Ray run costs minutes here), in two launches of
`attnpipe train`: in the first, both workers die at the end of epoch 2 and Ray restarts the
group from the epoch-1 checkpoint, which SIGTERM then stops; the same command, launched again,
resumes and finishes. One W&B run throughout.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from attnpipe.paths import PipelinePaths
from attnpipe.train.checkpoint import read_checkpoint
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


def test_killed_train_command_resumes_with_the_same_wandb_run(digits_project, tmp_path):
    """Also what test_worker_killed_in_epoch_2_restarts_from_epoch_1 checked: both workers die
    at the end of epoch 2, after validating it and before its checkpoint (an injected fault
    point, not a timed kill); Ray restarts the group from epoch 1. Then SIGTERM (what `kill`,
    schedulers and preemption send; Ctrl-C takes the same path) stops the restarted group."""
    recipe, _ = digits_project
    paths = _copy_project(digits_project, tmp_path / "project")
    trace, faults = tmp_path / "trace", tmp_path / "faults"
    first_output, kept = _launch_killed_then_stopped(paths, trace, faults)

    assert sorted(p.name for p in faults.iterdir()) == [
        "fired-validated-2-rank0",
        "fired-validated-2-rank1",
    ]
    # Restarted from the epoch-1 checkpoint (was `result.resumed_from == [1]`: no TrainResult
    # comes back from a command; the final state's list is checked after the relaunch) ...
    assert "resuming from the checkpoint of epoch 1 (of 3)" in first_output, first_output[-3000:]
    starts = [e for e in events(trace, 1) if e["event"] == "start"]
    assert [e["epoch"] for e in starts] == [0, 1]
    killed = next(e for e in events(trace, 1) if e["event"] == "epoch" and e["epoch"] == 2)
    assert starts[1]["pid"] != killed["pid"]

    second = start_attnpipe(paths.root, "train", tmp_path / "trace2", WANDB_MODE="offline")
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output[-3000:]
    assert f"resuming from the checkpoint of epoch {kept}" in output
    epochs_started = [e["epoch"] for e in events(tmp_path / "trace2", 0) if e["event"] == "epoch"]
    assert epochs_started == list(range(kept + 1, 4))  # only the unfinished epochs again
    assert paths.model_file.is_file()
    # ... and finished (was `result.epochs_run`: train.json holds the same count).
    assert json.loads(paths.train_metrics.read_text())["epochs_run"] == recipe.train.epochs == 3
    # The restarted group's resume (from 1) is saved only if it finished an epoch before the
    # SIGTERM (kept 2); the relaunch's (from kept) always.
    newest = sorted(p for p in paths.checkpoints.glob("*/checkpoint_*") if p.is_dir())[-1]
    state = read_checkpoint(newest)["state"]
    assert state["resumed_from"] == ([1, 2] if kept == 2 else [1])
    _check_one_wandb_run(paths, kept)


def _launch_killed_then_stopped(paths: PipelinePaths, trace: Path, faults: Path) -> tuple[str, int]:
    """The first launch: both workers die at `validated:2`; once Ray's restarted group trains
    epoch 2 again, SIGTERM. Its output and the epoch of the checkpoint it kept."""
    first = start_attnpipe(
        paths.root,
        "train",
        trace,
        WANDB_MODE="offline",
        ATTNPIPE_FAULT_AT="validated:2",
        ATTNPIPE_FAULT_DIR=str(faults),
    )
    try:
        wait_for_epoch(trace, rank=0, epoch=2)
        wait_for_epoch(trace, rank=0, epoch=2, nth=2)  # the restarted group's
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
    return output, kept


def _check_one_wandb_run(paths: PipelinePaths, kept: int) -> None:
    """One file per attempt: the killed one, the restarted one SIGTERM stopped, the relaunch.

    The killed attempt's rank 0 died without finishing its run, yet its epoch is kept; the
    later attempts continue the same run with the other two. (Row 1 is in the first file once
    W&B has written it, within FLUSH_INTERVAL_S; otherwise the restarted attempt logs it:
    either way every epoch once, in order.)"""
    runs = sorted((paths.root / "wandb").glob("offline-run-*/run-*.wandb"))
    # One per attempt: three (each of the two tests merged here had two: its two launches, or
    # the two attempts of its one launch) ...
    assert len(runs) == 3
    records = [read_records(run) for run in runs]
    ids = [run_ids(r) for r in records]
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 1  # ... continuing one W&B run ...
    logged = [[row["epoch"] for row in history_rows(r) if "epoch" in row] for r in records]
    assert [epoch for attempt in logged for epoch in attempt] == [1, 2, 3]
    # ... and the stopped launch flushed its epochs before exiting: none is lost.
    assert logged[0] + logged[1] == list(range(1, kept + 1))
    assert logged[2] == list(range(kept + 1, 4))
    # Epoch 2's row is never the killed attempt's: it died before epoch 2's checkpoint.
    assert (logged[1] + logged[2])[-2:] == [2, 3]
    assert any(key.startswith("val/attention_overlays/") for key in history_rows(records[2])[-1])
