"""Provenance: the commit recorded in model.pt."""

from __future__ import annotations

import subprocess
from pathlib import Path

from attnpipe.tracking import artifact_aliases, git_commit, wandb_keys

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
