"""Issue 28: a training worker killed in the middle of an epoch costs only the steps since the
last mid-epoch checkpoint, and the run ends with the weights of the run nobody killed.

Digits, 2 CPU ranks with 2 loader workers each, `train.deterministic`, a checkpoint every 5
optimizer steps (epochs of 9 steps). Rank 0 dies by SIGKILL after the 7th step of epoch 1 (an
injected fault point, `trained:1.7@0`); Ray Train restarts the group, which resumes from the
checkpoint of step 5 and trains on. Two Ray runs: this one and the uninterrupted reference.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from attnpipe.config import apply_overrides
from attnpipe.paths import PipelinePaths
from attnpipe.train.checkpoint import read_checkpoint
from attnpipe.train.launch import TrainResult, train

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

SETTINGS = {
    "train.epochs": 2,
    "train.workers": 2,
    "train.loader_workers": 2,
    "train.batch_size": 64,  # 1,257 images over 2 ranks: 9 steps per epoch
    "train.deterministic": True,
    "train.checkpoint_every": 5,
    "tracking.wandb.mode": "disabled",
}


def _run(digits_project, folder: Path, monkeypatch: pytest.MonkeyPatch) -> TrainResult:
    recipe, built = digits_project
    shutil.copytree(built.root, folder, dirs_exist_ok=True)
    monkeypatch.setenv("ATTNPIPE_TRACE_DIR", str(folder / "trace"))
    return train(apply_overrides(recipe, SETTINGS, origin="test"), PipelinePaths(folder, "digits"))


def _last_checkpoint(folder: Path) -> dict:
    storage = folder / "models" / "digits" / "checkpoints"
    newest = sorted(p for p in storage.glob("*/checkpoint_*") if p.is_dir())[-1]
    return read_checkpoint(newest)


def test_a_worker_killed_mid_epoch_resumes_at_the_next_sample_with_equal_weights(
    digits_project, tmp_path, monkeypatch, capfd
):
    reference = _run(digits_project, tmp_path / "reference", monkeypatch)
    capfd.readouterr()
    monkeypatch.setenv("ATTNPIPE_FAULT_AT", "trained:1.7@0")
    monkeypatch.setenv("ATTNPIPE_FAULT_DIR", str(tmp_path / "faults"))
    killed = _run(digits_project, tmp_path / "killed", monkeypatch)
    output = capfd.readouterr().out

    assert [p.name for p in (tmp_path / "faults").iterdir()] == ["fired-trained-1.7-rank0"]
    assert "resumed from epoch 0, step 5 of epoch 1's 9" in output, output[-3000:]
    assert killed.resumed_from == [0] and reference.resumed_from == []
    assert killed.epochs_run == reference.epochs_run == 2

    want = _last_checkpoint(tmp_path / "reference")
    got = _last_checkpoint(tmp_path / "killed")
    assert want["model"].keys() == got["model"].keys()
    for key, value in want["model"].items():
        assert torch.equal(value, got["model"][key]), key
    for row_want, row_got in zip(want["state"]["history"], got["state"]["history"], strict=True):
        for key in ("epoch", "train_loss", "val_loss", "val_accuracy", "lr"):
            assert row_got[key] == row_want[key], (row_want["epoch"], key)

    # The resumed attempt trained epoch 1 from its 6th batch on: the uninterrupted order.
    for rank in (0, 1):
        name = f"epoch1-rank{rank}.txt"
        whole = (tmp_path / "reference" / "trace" / name).read_text().split()
        rest = (tmp_path / "killed" / "trace" / name).read_text().split()
        assert rest == whole[5 * 64 :]
