"""Checkpoint and resume state: what rank 0 saves at the end of an epoch, and what a
restarted or re-launched run picks up from the latest checkpoint."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from attnpipe.train.build import Run
from attnpipe.train.checkpoint import (
    TrainingState,
    prune_best_weights,
    read_checkpoint,
    restore_rng,
    restore_scaler,
    rng_state,
    write_best_weights,
    write_checkpoint,
)
from attnpipe.train.reporting import say
from attnpipe.train.schedules import rewarm_plan, scaled_lr


def resume(run: Run) -> TrainingState:
    """The state of the latest checkpoint (weights, optimizer, RNGs...), or a fresh one."""
    with run.session.latest_checkpoint() as folder:
        saved = read_checkpoint(folder) if folder else None
    if not saved:
        return TrainingState()
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    restore_scaler(run.scaler, saved["scaler"])
    if run.ema is not None and saved.get("ema"):
        run.ema.load_state_dict(saved["ema"])
    restore_rng(saved["rng"], run.rank, run.device)
    state = TrainingState.from_dict(saved["state"])
    # Where the samples trained on put it, in this world size's steps: a run resumed on more
    # or fewer ranks (elastic) keeps its place. Checkpoints without the count: by epochs.
    if state.samples_seen:
        run.schedule.set_position_by_samples(state.samples_seen, run.samples_per_epoch)
    else:
        run.schedule.set_position(state.epoch)
    rewarm_after_growth(run, state)
    state.resumed_from.append(state.epoch)
    if run.rank == 0:
        say(f"resuming from the checkpoint of epoch {state.epoch} (of {run.train.epochs})")
    return state


def rewarm_after_growth(run: Run, state: TrainingState) -> None:
    """A run resumed on more ranks than it last trained on (elastic growth) ramps its scaled
    rate up from the smaller world's over `train.rewarm_steps` steps."""
    train = run.train
    worlds = [row.get("world_size") for row in state.history]
    plan = rewarm_plan(worlds, run.world, run.schedule.steps_per_epoch, train.rewarm_steps)
    if plan is None:
        return
    before, done = plan
    per_rank = train.batch_size * train.accumulate_steps
    run.schedule.rewarm(scaled_lr(train.optimizer, before * per_rank), train.rewarm_steps, done)
    if run.rank == 0 and run.schedule.current_base() < run.schedule.base_lr:
        say(
            f"{before} -> {run.world} ranks: the learning rate re-warms to its new scale over "
            f"{train.rewarm_steps} steps (train.rewarm_steps)"
        )


def save_checkpoint(run: Run, state: TrainingState, row: dict[str, Any], improved: bool) -> None:
    """Rank 0 writes the checkpoint; every rank reports (Ray records it once all have).

    The best weights go to a file of their own, only when the epoch improved; the checkpoint
    names that file. Older files go once no checkpoint that may still be resumed names them.
    """
    rngs = _gather_rng_states(run.world, run.device)
    previous_best = state.best_location
    with tempfile.TemporaryDirectory() as folder:
        checkpoint_dir = None
        if run.rank == 0:
            if improved and state.best_weights is not None:
                state.best_location = write_best_weights(
                    run.config.best_weights_dir, state.epoch, state.best_weights
                )
            checkpoint_dir = Path(folder)
            write_checkpoint(
                checkpoint_dir,
                {
                    "model": run.model.state_dict(),
                    "optimizer": run.optimizer.state_dict(),
                    "schedule_step": run.schedule.step_count,
                    "scaler": run.scaler.state_dict(),
                    "ema": run.ema.state_dict() if run.ema is not None else None,
                    "rng": rngs,
                    "state": state.to_dict(),
                },
            )
        run.session.report(_scalars(row), checkpoint_dir)
    if run.rank == 0 and improved:
        prune_best_weights(run.config.best_weights_dir, {previous_best, state.best_location})


def _gather_rng_states(world: int, device: torch.device) -> list[dict[str, Any]]:
    state = rng_state(device)
    if world == 1:
        return [state]
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, state)
    return parts


def cpu_copy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state_dict.items()}


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, int | float)}
