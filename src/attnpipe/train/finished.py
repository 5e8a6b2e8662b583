"""A finished run's record, beside its best weights: launched again, the same run is found
finished by the driver, which writes the outputs from it without starting Ray.

`dvc repro` after a failed upload, `attnpipe run` (which runs every stage), a re-submitted job:
each launched the whole run again, a cluster and a worker group, for workers that found the
run finished and trained nothing. The record holds the run's final state (the same the last
checkpoint holds) and the W&B run that finished it. Rank 0 writes it as the last act of a run's
end (after the W&B summary, the model artifact and the offline run's export) and deletes it when
an attempt starts training, so it exists only while finishing was the last thing the run did.
A relaunch that cannot take it (none, another W&B run such as a DVC experiment's, a recipe under
which the run is not finished) launches the run on Ray, as before.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from attnpipe import storage
from attnpipe.config import TrainConfig
from attnpipe.train.checkpoint import TrainingState

FINISHED_FILE = "finished.pt"


def finished_location(best_weights_dir: str) -> str:
    return storage.join(best_weights_dir, FINISHED_FILE)


def record_finished(best_weights_dir: str, state: TrainingState, wandb_run_id: str) -> None:
    """The run's end, written last: its state and the W&B run that holds its summary."""
    buffer = io.BytesIO()
    torch.save({"state": state.to_dict(), "wandb_run_id": wandb_run_id}, buffer)
    storage.write_bytes(finished_location(best_weights_dir), buffer.getvalue())


def forget_finished(best_weights_dir: str) -> None:
    """The run trains again (more epochs, a stop lifted): its record no longer says its end."""
    location = finished_location(best_weights_dir)
    if storage.exists(location):
        storage.delete_file(location)


def finished_state(
    best_weights_dir: str, wandb_run_id: str, train: TrainConfig
) -> TrainingState | None:
    """The run's final state when it finished, with this W&B run, and has nothing to train
    under `train`; else None (the workers decide)."""
    location = finished_location(best_weights_dir)
    if not storage.exists(location):
        return None
    record: dict[str, Any] = torch.load(
        io.BytesIO(storage.read_bytes(location)), map_location="cpu", weights_only=True
    )
    state = TrainingState.from_dict(record["state"])
    if record["wandb_run_id"] != wandb_run_id or not state.finished(train):
        return None
    return state


def already_finished(state: TrainingState, patience: int | None) -> str:
    """What a re-launched run that has nothing left to train says."""
    if state.should_stop(patience):
        why = f"early stopping ended it at epoch {state.epoch} (patience {patience})"
    else:
        why = f"it trained all its epochs ({state.epoch})"
    return (
        f"nothing to train: {why}; the best epoch stays {state.best_epoch}. To train "
        "again, change a model, augment or train setting of the recipe: that is a new run"
    )
