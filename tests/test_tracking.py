"""Provenance (the commit recorded in model.pt) and the W&B run a process owns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from attnpipe.config import WandbConfig
from attnpipe.tracking import WandbRun, artifact_aliases, git_commit, wandb_keys

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid"]


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        [*GIT, *args], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_commit_is_dirty_for_source_changes_not_for_pipeline_outputs(tmp_path):
    assert git_commit(tmp_path) == "unknown"
    _git(tmp_path, "init", "-q")
    for name in ("src.py", "dvc.lock", "reports/digits/train_history.csv", "models/d/.gitignore"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("v1\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-q", "-m", "v1")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert git_commit(tmp_path) == head
    # What `dvc repro` does before and after running train: not a source change.
    (tmp_path / "reports/digits/train_history.csv").unlink()
    (tmp_path / "dvc.lock").write_text("v2\n")
    (tmp_path / "models/d/.gitignore").write_text("v2\n")
    (tmp_path / "untracked.txt").write_text("new\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "src.py").write_text("v2\n")
    assert git_commit(tmp_path) == f"{head}-dirty"


def test_history_columns_get_wandb_names_by_split():
    row = {"epoch": 3, "train_loss": 0.5, "lr": 0.1, "val_accuracy": 0.9, "epoch_seconds": 2.0}
    assert wandb_keys(row) == {
        "epoch": 3,
        "train/loss": 0.5,
        "train/lr": 0.1,
        "val/accuracy": 0.9,
        "train/epoch_seconds": 2.0,
    }


def test_artifact_aliases_drop_missing_and_characters_wandb_refuses():
    assert artifact_aliases("best", "abc-dirty", "exp/one:two") == [
        "best",
        "abc-dirty",
        "exp-one-two",
    ]
    assert artifact_aliases(None, "abc", None) == ["abc"]
    assert artifact_aliases("best", "best", "") == ["best"]


_CHILD_RUN = """
import os, signal, sys
from pathlib import Path
from attnpipe.config import WandbConfig
from attnpipe.tracking import WandbRun
run = WandbRun.start(WandbConfig(), "resumed-after-kill", "r", Path(sys.argv[1]), {})
run.log({"train/loss": 1.0}, step=int(sys.argv[2]))
if sys.argv[3] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
run.finish()
"""


def _child(directory: Path, step: int, end: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _CHILD_RUN, str(directory), str(step), end],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.timing  # its W&B children have 120 s
def test_a_run_killed_under_a_logging_parent_resumes_with_its_id(tmp_path, monkeypatch):
    """A driver (or pytest) that logged to W&B itself must not hand its service to the
    processes it starts: a killed child would leave its run open there, and the relaunch would
    be refused with "run ID ... is in use"."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    parent = WandbRun.start(WandbConfig(), "parent", "parent", tmp_path / "parent", {})
    try:
        assert "WANDB_SERVICE" not in os.environ
        killed = _child(tmp_path / "child", 0, "kill")
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        relaunched = _child(tmp_path / "child", 1, "finish")
        assert relaunched.returncode == 0, relaunched.stderr[-2000:]
        parent.log({"train/loss": 0.5}, step=0)  # the parent's own connection still works
    finally:
        parent.finish()
