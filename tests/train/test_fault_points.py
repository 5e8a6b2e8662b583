"""A kill at any point of an epoch's end leaves every epoch once in W&B and in the history.

The loop kills itself (SIGKILL: nothing flushed, W&B not finished) at the points
ATTNPIPE_FAULT_AT names: after validation but before the checkpoint, between the checkpoint
and the W&B row, and after the row. One run is launched again after each kill, as a person or a
scheduler would; it is the loop under `python -m attnpipe.train.torchrun` (one process, no
Ray: what is tested is the loop's order, and Ray's restarts are tested in test_fault_tolerance).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnpipe.train.checkpoint import read_checkpoint
from attnpipe.train.faults import FaultSpecError, planned_faults
from tests.wandb_offline import history_rows, read_records, run_ids

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

FAULTS = "validated:1,checkpointed:1,logged:2"


def _launch(root: Path, storage: Path, faults: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "ATTNPIPE_FAULT_AT": FAULTS,
        "ATTNPIPE_FAULT_DIR": str(faults),
    }
    command = [sys.executable, "-m", "attnpipe.train.torchrun", "digits", "--root", str(root)]
    command += ["--storage", str(storage), "--set", "train.epochs=3", "--set", "train.workers=1"]
    command += ["--set", "train.batch_size=64"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_a_kill_before_between_and_after_row_and_checkpoint_repeats_and_loses_nothing(
    digits_project, tmp_path
):
    _, built = digits_project
    root = tmp_path / "project"
    shutil.copytree(built.root, root)
    storage, faults = tmp_path / "storage", tmp_path / "faults"

    outcomes = [_launch(root, storage, faults) for _ in range(4)]
    codes = [o.returncode for o in outcomes]
    # Three launches die at their fault (one each, in the order of the run), the fourth ends.
    assert codes == [-signal.SIGKILL] * 3 + [0], outcomes[-1].stderr[-3000:]
    assert sorted(p.name for p in faults.iterdir()) == sorted(
        f"fired-{fault.replace(':', '-')}-rank0" for fault in FAULTS.split(",")
    )

    runs = sorted(root.glob("wandb/offline-run-*/run-*.wandb"))
    records = [read_records(run) for run in runs]
    assert len(runs) == 4 and len(set.union(*map(run_ids, records))) == 1  # one W&B run
    logged = [[row["epoch"] for row in history_rows(r) if "epoch" in row] for r in records]
    # Killed before checkpoint 1: nothing logged; between checkpoint 1 and its row: the next
    # launch logs row 1 first. Killed right after row 2: W&B writes its file once a second,
    # so row 2 is in the third file (never logged again) or, lost with the process, in the
    # fourth: either way each epoch exactly once.
    assert logged[:2] == [[], []] and logged[2][0] == 1
    assert sorted(epoch for launch in logged for epoch in launch) == [1, 2, 3]

    newest = sorted(storage.glob("checkpoint_*"))[-1]
    state = read_checkpoint(newest)["state"]
    assert [row["epoch"] for row in state["history"]] == [1, 2, 3]
    assert state["resumed_from"] == [1, 2]
    assert state["best_location"] and Path(state["best_location"]).is_file()


def test_fault_spec_is_checked():
    assert planned_faults("checkpointed:2, logged:3") == {("checkpointed", 2), ("logged", 3)}
    assert planned_faults("") == set()
    with pytest.raises(FaultSpecError, match="phase one of validated, checkpointed, logged"):
        planned_faults("saved:2")
    with pytest.raises(FaultSpecError, match="<phase>:<epoch>"):
        planned_faults("logged")


def test_checkpoints_hold_no_best_weights(tmp_path):
    """(Format check of the state: the weights live in their own file.)"""
    from attnpipe.train.checkpoint import TrainingState

    state = TrainingState()
    state.best_weights = {"w": torch.ones(2)}
    state.best_location = str(tmp_path / "epoch0001.pt")
    assert "best_weights" not in state.to_dict()
    assert TrainingState.from_dict(state.to_dict()).best_location == state.best_location
