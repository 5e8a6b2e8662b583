"""One epoch of the real training loop, in this process, with MixUp, CutMix and erasing on."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from attnpipe.config import apply_overrides
from attnpipe.data.loaders import split_info, steps_per_epoch
from attnpipe.train import build, loop
from attnpipe.train.loop_config import LoopConfig


class LocalSession:
    """A `WorkerSession` of one CPU rank that keeps what the loop reports."""

    rank, world_size, node_id = 0, 1, "test-node"
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.reports: list[tuple[dict[str, float], list[str]]] = []

    def prepare_model(self, model: nn.Module, forward_sync_buffers: bool = True) -> nn.Module:
        return model

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        yield None

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        files = sorted(p.name for p in checkpoint_dir.iterdir()) if checkpoint_dir else []
        self.reports.append((metrics, files))

    def stop_requested(self) -> bool:
        return False


class TargetLog(nn.Module):
    """The recipe's own loss, noting the targets of every training call."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss
        self.targets: list[torch.Tensor] = []

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.targets.append(targets.detach().clone())
        return self.loss(logits, targets)


@pytest.fixture
def restore_threads() -> Iterator[None]:
    previous = torch.get_num_threads()  # `build` sets the recipe's thread count
    yield
    torch.set_num_threads(previous)


# What is checked (soft targets at every step, nearly every batch mixed, finite losses) is per
# batch: 22 small batches of the small project's 361 images (tests/train/conftest.py) check it
# on more batches than 19 of 64 of the shared project's 1,257 did, at under half the cost.
BATCH = 16


def test_one_epoch_with_mixup_and_cutmix_reports_finite_losses(
    small_digits_project, tmp_path, monkeypatch, restore_threads
):
    recipe, paths = small_digits_project
    recipe = apply_overrides(
        recipe,
        {
            "augment.mixup_alpha": 0.2,
            "augment.cutmix_alpha": 1.0,
            "augment.random_erasing": 0.25,
            "train.epochs": 1,
            "train.batch_size": BATCH,
            "train.cpus_per_worker": 1,
            "tracking.wandb.mode": "disabled",
        },
        origin="test",
    )
    monkeypatch.delenv("ATTNPIPE_TRACE_DIR", raising=False)
    logged: list[TargetLog] = []

    def build_loss(config, counts):
        logged.append(TargetLog(loop_build_loss(config, counts)))
        return logged[-1]

    loop_build_loss = build.build_loss
    monkeypatch.setattr(build, "build_loss", build_loss)
    session = LocalSession()
    config = LoopConfig(
        recipe=recipe,
        shards=str(paths.shards),
        run_name="mixing",
        best_weights_dir=str(tmp_path / "best"),
        wandb_run_id="mixing",
        wandb_parent=str(tmp_path),
        run_config={"data_version": "unknown"},  # what start_tracking reads
    )
    loop.run_training(config, session)

    assert len(session.reports) == 1  # one epoch, one report, with its checkpoint
    metrics, files = session.reports[0]
    assert files
    assert metrics["epoch"] == 1
    assert math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    assert math.isfinite(metrics["val_loss"]) and 0 <= metrics["val_accuracy"] <= 1
    targets = logged[0].targets  # the criterion saw mixed soft targets, never integer labels
    steps = steps_per_epoch(split_info(paths.shards, "train").samples, 1, BATCH)
    assert len(targets) == steps
    assert all(t.shape == (BATCH, 10) and t.dtype == torch.float32 for t in targets)
    assert all(torch.allclose(t.sum(1), torch.ones(BATCH)) for t in targets)
    # A CutMix box can come out empty (then every row is one-hot): nearly every batch mixes.
    assert sum(bool((t.max(1).values < 1).any()) for t in targets) >= steps - 2
