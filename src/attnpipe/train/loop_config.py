"""What every training worker is given: one typed object, built the same way by train and tune."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from attnpipe.config import Recipe


@dataclass(frozen=True)
class LoopConfig:
    """Everything one rank needs (pickled to each Ray worker; plain values and the recipe)."""

    recipe: Recipe
    shards: str  # folder or URL of the shards (index.json inside)
    run_name: str  # the Ray Train run: its checkpoints live under storage/run_name
    best_weights_dir: str  # folder or URL for the best epoch's weights (checkpoint.py)
    wandb_run_id: str
    wandb_parent: str  # W&B writes its runs to `wandb/` inside this folder
    run_config: dict[str, Any]  # what W&B records: recipe, commit, code and data versions
    use_gpu: bool = False  # decided by the driver from the cluster, never by a worker
    # Ranks, decided by the driver (`train.workers: auto` resolved; (min, max): elastic);
    # None: train.workers as given (a number).
    workers: int | tuple[int, int] | None = None
    wandb_group: str | None = None
    stop_name: str | None = None  # the named Ray actor the driver sets to ask for a stop
    # Shared storage (train.storage_path) where rank 0 leaves its offline W&B run, so that it
    # survives the node (autoscalers delete idle nodes); None when training stays on one machine.
    wandb_export: str | None = None
    # The DVC experiment (`dvc exp run`) this run belongs to: in the W&B run's name and tags.
    experiment_name: str | None = None
    wandb_tags: tuple[str, ...] = ()

    def with_changes(self, **changes: Any) -> LoopConfig:
        return replace(self, **changes)
