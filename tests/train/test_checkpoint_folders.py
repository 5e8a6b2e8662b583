"""torchrun's checkpoints (issue 28): each written whole or not at all, the newest
`checkpoints_to_keep` kept, and a resume passes over one cut short for the one before."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
import torch

from attnpipe.train import checkpoint_folders
from attnpipe.train.checkpoint import CHECKPOINT_FILE, read_checkpoint
from attnpipe.train.session import TorchrunSession


@pytest.fixture
def session(tmp_path):
    """One CPU rank writing to `tmp_path/storage`, keeping 2; SIGTERM's handler put back."""
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield TorchrunSession(tmp_path / "storage", use_gpu=False, keep=2)
    finally:
        signal.signal(signal.SIGTERM, before)


def _report_epoch(session: TorchrunSession, folder: Path, epoch: int) -> None:
    """What `save_checkpoint` hands over: a scratch folder with rank 0's checkpoint file."""
    scratch = folder / f"scratch{epoch}"
    scratch.mkdir(exist_ok=True)
    torch.save({"epoch": epoch, "weights": torch.arange(1000.0)}, scratch / CHECKPOINT_FILE)
    session.report({"epoch": float(epoch)}, scratch)


def _resumed_epoch(session: TorchrunSession) -> int | None:
    with session.latest_checkpoint() as folder:
        return read_checkpoint(folder)["epoch"] if folder else None


def test_only_the_newest_checkpoints_to_keep_are_kept(session, tmp_path):
    assert _resumed_epoch(session) is None
    for epoch in range(1, 5):
        _report_epoch(session, tmp_path, epoch)
    kept = sorted(p.name for p in session.storage.iterdir())
    assert kept == ["checkpoint_000003", "checkpoint_000004"]
    assert _resumed_epoch(session) == 4
    # A relaunch numbers on from the newest, not from how many there are (no name reused).
    before = signal.getsignal(signal.SIGTERM)
    again = TorchrunSession(session.storage, use_gpu=False, keep=2)
    signal.signal(signal.SIGTERM, before)
    _report_epoch(again, tmp_path, 5)
    assert sorted(p.name for p in session.storage.iterdir())[-1] == "checkpoint_000005"


def test_a_copy_killed_midway_is_passed_over_and_cleared_by_the_next(
    session, tmp_path, monkeypatch
):
    _report_epoch(session, tmp_path, 1)
    copytree = shutil.copytree

    def killed_midway(source: Path, target: Path) -> None:
        copytree(source, target)
        with open(Path(target) / CHECKPOINT_FILE, "r+b") as handle:
            handle.truncate(100)  # the process died here
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_folders.shutil, "copytree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        _report_epoch(session, tmp_path, 2)
    monkeypatch.undo()
    assert [p.name for p in session.storage.iterdir() if p.name.startswith(".partial-")]
    assert _resumed_epoch(session) == 1  # the complete one before, not the cut one
    _report_epoch(session, tmp_path, 2)  # the relaunch trains epoch 2 again
    assert sorted(p.name for p in session.storage.iterdir()) == [
        "checkpoint_000001",
        "checkpoint_000002",
    ]
    assert _resumed_epoch(session) == 2


def test_a_truncated_checkpoint_in_its_final_folder_is_passed_over(session, tmp_path):
    """Written in place by an older version and cut by a kill (or by a full disk)."""
    _report_epoch(session, tmp_path, 1)
    _report_epoch(session, tmp_path, 2)
    newest = session.storage / "checkpoint_000002" / CHECKPOINT_FILE
    with open(newest, "r+b") as handle:
        handle.truncate(newest.stat().st_size // 2)
    assert _resumed_epoch(session) == 1
    (session.storage / "checkpoint_000002" / CHECKPOINT_FILE).unlink()  # or no file at all
    assert _resumed_epoch(session) == 1
