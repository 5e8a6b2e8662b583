"""What a training checkpoint holds, and the run's memory across restarts (`TrainingState`).

One file per checkpoint (`checkpoint.pt`), written by rank 0 at the end of every epoch and,
with `train.checkpoint_every`, within epochs: the weights, optimizer, EMA, gradient scaler,
schedule step, every rank's random number generators (torch's CPU one and, on GPUs, CUDA's;
numpy's and Python's) and the `TrainingState` (epoch, history, best epoch and where its weights
are). A mid-epoch checkpoint also holds its `EpochPosition`: how far into the next epoch each
rank has trained, and the partial sums of the epoch's row. Plain tensors and values: it loads
with `weights_only=True`.

Mid-epoch checkpoints are single files beside the best weights, `<run>/mid-epoch/
e<epoch>-s<step>.pt` (`mid_epoch_location`), not Ray Train checkpoints (see
`attnpipe.train.checkpoint_writer` for why); a resume takes the newest one when it goes further
than the latest epoch checkpoint.

The best weights are not in every checkpoint (for Attention-92 with its optimizer state that
would upload hundreds of MB per epoch for nothing): they go to a file of their own,
`<best dir>/epoch<k>.pt`, written only in an epoch that improved; the checkpoints name it. Ray's
`CheckpointConfig(num_to_keep)` deletes old checkpoint folders, never these files.
"""

from __future__ import annotations

import io
import os
import random
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from attnpipe import storage
from attnpipe.config import TrainConfig
from attnpipe.modelfile import Provenance, write_model_file

if TYPE_CHECKING:
    from attnpipe.train.loop_config import LoopConfig

CHECKPOINT_FILE = "checkpoint.pt"
MID_EPOCH_FOLDER = "mid-epoch"
_MID_EPOCH_NAME = re.compile(r"^e(\d+)-s(\d+)\.pt$")


class TrainingState:
    """Epoch counter, history and best-so-far: everything a resumed run must not forget."""

    def __init__(self) -> None:
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best: float | None = None
        self.best_epoch = 0
        self.best_weights: dict[str, torch.Tensor] | None = None  # in memory, not saved
        self.best_location: str | None = None  # the file that holds them (see write_best_weights)
        self.resumed_from: list[int] = []  # epochs a restarted or re-launched run went on from
        self.samples_seen = 0  # training samples of the finished epochs, over all ranks

    def record(self, row: dict[str, Any], monitor: str) -> bool:
        """Append an epoch's row; whether it is the best so far on `monitor`."""
        self.history.append(row)
        value = row[monitor]
        lower_is_better = monitor.endswith("loss")
        if value != value:  # NaN never improves
            return False
        better = self.best is None or (value < self.best if lower_is_better else value > self.best)
        if better:
            self.best, self.best_epoch = float(value), self.epoch
        return better

    def should_stop(self, patience: int | None) -> bool:
        return patience is not None and self.epoch - self.best_epoch >= patience

    def finished(self, train_cfg: TrainConfig) -> bool:
        """All epochs trained, or early stopping ended the run."""
        return self.epoch >= train_cfg.epochs or self.should_stop(train_cfg.early_stopping_patience)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "history": self.history,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "best_location": self.best_location,
            "resumed_from": self.resumed_from,
            "samples_seen": self.samples_seen,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingState:
        state = cls()
        state.epoch = data["epoch"]
        state.history = list(data["history"])
        state.best = data["best"]
        state.best_epoch = data["best_epoch"]
        # Checkpoints of earlier versions carried the weights themselves.
        state.best_weights = data.get("best_weights")
        state.best_location = data.get("best_location")
        state.resumed_from = list(data.get("resumed_from", []))
        state.samples_seen = int(data.get("samples_seen", 0))
        return state


@dataclass
class EpochPosition:
    """How far into epoch `epoch` (0-based: the number of epochs finished) the run got: what a
    mid-epoch checkpoint adds, so that a resume continues at the next sample.

    `step`: batches every rank trained on this epoch; the layout it was trained in (ranks,
    loader workers, batch) says whether the loaders can skip exactly those samples. Per rank:
    `loss_sums` and `samples` so far (the epoch's train_loss and sample count come out as if
    uninterrupted), `seconds` of training so far, and `readers`: the samples each of its
    loader's readers has given.
    """

    epoch: int
    step: int
    world_size: int
    loader_workers: int
    batch_size: int
    loss_sums: list[torch.Tensor] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    readers: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> EpochPosition | None:
        return cls(**data) if data else None

    @property
    def samples_trained(self) -> int:
        """Training samples of this epoch so far, all ranks."""
        return sum(self.samples)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generators: torch's CPU one, the CUDA one of `device` when on a GPU, and
    numpy's and Python's global ones (as tensors and numbers, for `weights_only` loading)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    return {
        "cpu": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": python_gauss,
        },
    }


def restore_rng(states: list[Any], rank: int, device: torch.device) -> None:
    """Put back rank `rank`'s generators (a resumed run on more ranks reuses them cyclically).

    Checkpoints of earlier versions hold a bare CPU state per rank, or no numpy and Python ones.
    """
    state = states[rank % len(states)]
    if isinstance(state, torch.Tensor):
        state = {"cpu": state, "cuda": None}
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    if state.get("numpy"):
        saved = state["numpy"]
        keys = saved["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, saved["pos"], saved["has_gauss"], saved["gauss"]))
    if state.get("python"):
        saved = state["python"]
        internal = tuple(int(v) for v in saved["internal"].tolist())
        random.setstate((saved["version"], internal, saved["gauss"]))


def write_checkpoint(folder: Path, payload: dict[str, Any]) -> Path:
    path = folder / CHECKPOINT_FILE
    torch.save(payload, path)
    return path


def read_checkpoint(folder: Path) -> dict[str, Any]:
    return torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def mid_epoch_dir(best_weights_dir: str) -> str:
    """The run's mid-epoch checkpoints: beside its best weights (`<run>/best`), outside the
    checkpoint folders Ray Train or torchrun keep and delete."""
    parent = str(best_weights_dir).rstrip("/").rsplit("/", 1)[0]
    return storage.join(parent, MID_EPOCH_FOLDER)


def mid_epoch_location(folder: str, epoch: int, step: int) -> str:
    """`epoch`: the epochs finished; `step`: the batches trained of the next one."""
    return storage.join(folder, f"e{epoch:04d}-s{step:06d}.pt")


def mid_epoch_checkpoints(folder: str) -> list[tuple[int, int, str]]:
    """(epoch, step, location) of every mid-epoch checkpoint in `folder`, oldest first (a file
    still being written has another name)."""
    found = []
    for name in storage.list_files(folder):
        match = _MID_EPOCH_NAME.match(name)
        if match:
            found.append((int(match.group(1)), int(match.group(2)), storage.join(folder, name)))
    return sorted(found)


def write_checkpoint_file(location: str, payload: dict[str, Any]) -> None:
    """One checkpoint file at a path or URL, whole or not at all."""
    if storage.is_url(location):
        with tempfile.TemporaryDirectory() as scratch:
            local = Path(scratch) / CHECKPOINT_FILE
            torch.save(payload, local)
            storage.upload_file(local, location)
        return
    target = storage.local_path(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".partial-{target.name}")
    torch.save(payload, partial)
    os.replace(partial, target)


def read_checkpoint_file(location: str) -> dict[str, Any]:
    blob = io.BytesIO(storage.read_bytes(location))
    return torch.load(blob, map_location="cpu", weights_only=True)


def best_weights_location(folder: str, epoch: int) -> str:
    return storage.join(folder, f"epoch{epoch:04d}.pt")


def write_best_weights(folder: str, epoch: int, weights: dict[str, torch.Tensor]) -> str:
    """Save an improved epoch's weights to their own file (a path or URL); where they went."""
    location = best_weights_location(folder, epoch)
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / "best.pt"
        torch.save(weights, local)
        storage.upload_file(local, location)
    return location


def load_best_weights(state: TrainingState) -> dict[str, torch.Tensor] | None:
    """The best epoch's weights: in memory already, or read from the file the state names."""
    if state.best_weights is None and state.best_location is not None:
        blob = io.BytesIO(storage.read_bytes(state.best_location))
        state.best_weights = torch.load(blob, map_location="cpu", weights_only=True)
    return state.best_weights


def prune_best_weights(folder: str, keep: set[str]) -> None:
    """Delete the best-weight files no checkpoint that may still be resumed from names."""
    for name in storage.list_files(folder):
        location = storage.join(folder, name)
        if name.startswith("epoch") and name.endswith(".pt") and location not in keep:
            storage.delete_file(location)


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict[str, Any]) -> None:
    """The gradient scaler's state, when both the checkpoint and this run use one: a run
    resumed with another `amp` mode (bf16 or off saves an empty state; fp16 scales) starts
    with a fresh scale instead of failing."""
    if saved and scaler.is_enabled():
        scaler.load_state_dict(saved)


def write_best_model(
    path: Path, loop: LoopConfig, state: TrainingState, classes: list[str]
) -> dict[str, float]:
    """`model.pt` from the best epoch's weights (the driver's output, and rank 0's W&B model
    artifact: the same file); returns the best epoch's validation metrics."""
    best_row = next(r for r in state.history if r["epoch"] == state.best_epoch)
    best_metrics = {k: v for k, v in best_row.items() if k.startswith("val_")}
    write_model_file(
        path,
        recipe=loop.recipe,
        state_dict=load_best_weights(state),
        class_names=classes,
        provenance=Provenance(
            epoch=state.best_epoch,
            metrics=best_metrics,
            git_commit=loop.run_config["git_commit"],
            code_version=loop.run_config["code_version"],
            data_version=loop.run_config["data_version"],
            run_name=loop.run_name,
            wandb_run_id=loop.wandb_run_id,
            wandb_group=loop.wandb_group or loop.wandb_run_id,
        ),
    )
    return best_metrics
