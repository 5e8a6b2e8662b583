"""Checkpoint and resume state: what rank 0 saves at the end of an epoch and, with
`train.checkpoint_every`, within epochs (`MidEpochCheckpoints`), and what a restarted or
re-launched run picks up from the latest checkpoint."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from attnpipe import storage
from attnpipe.data.reader_plan import batches_taken
from attnpipe.train.build import Run
from attnpipe.train.checkpoint import (
    EpochPosition,
    TrainingState,
    mid_epoch_checkpoints,
    mid_epoch_dir,
    mid_epoch_location,
    prune_best_weights,
    read_checkpoint,
    read_checkpoint_file,
    restore_rng,
    restore_scaler,
    rng_state,
    write_best_weights,
    write_checkpoint,
    write_checkpoint_file,
)
from attnpipe.train.checkpoint_writer import CheckpointClock, CheckpointWriter, snapshot
from attnpipe.train.faults import step_fault_point, step_faults_planned
from attnpipe.train.reporting import say
from attnpipe.train.schedules import rewarm_plan, scaled_lr
from attnpipe.train.steps import EpochProgress
from attnpipe.train.stop_vote import StopVote


def resume(run: Run) -> tuple[TrainingState, EpochProgress]:
    """The state of the latest checkpoint (weights, optimizer, RNGs...), or a fresh one, and
    where in the next epoch it was taken (step 0 for an epoch's end)."""
    with run.session.latest_checkpoint() as folder:
        saved = read_checkpoint(folder) if folder else None
    further = newer_mid_epoch_checkpoint(run, saved["state"]["epoch"] if saved else 0)
    if further is not None:
        saved = read_checkpoint_file(further)
    if not saved:
        return TrainingState(), EpochProgress()
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
    progress = resumed_progress(run, EpochPosition.from_dict(saved.get("position")))
    run.schedule.advance(progress.step // run.train.accumulate_steps)
    state.resumed_from.append(state.epoch)
    if run.rank == 0:
        within = f" of epoch {state.epoch + 1}'s {run.steps}" if progress.step else ""
        say(
            f"resuming from the checkpoint of epoch {state.epoch} (of {run.train.epochs}): "
            f"resumed from epoch {state.epoch}, step {progress.step}{within}"
        )
    return state, progress


def newer_mid_epoch_checkpoint(run: Run, epochs_done: int) -> str | None:
    """The newest mid-epoch checkpoint, if it goes further than the epoch checkpoint of
    `epochs_done` epochs. Rank 0 looks and tells the others: a file of the last attempt may
    still be landing while they look."""
    choice = None
    if run.rank == 0:
        found = mid_epoch_checkpoints(mid_epoch_dir(run.config.best_weights_dir))
        newer = [location for epoch, _, location in found if epoch >= epochs_done]
        choice = newer[-1] if newer else None
    if run.world > 1:
        shared = [choice]
        dist.broadcast_object_list(shared, src=0)
        choice = shared[0]
    return choice


def trained_batch_size(run: Run) -> int:
    """The training batch of this layout (smaller than asked only for a tiny split)."""
    return run.train_stream.plan(run.train.loader_workers, run.train.batch_size).batch_size


def resumed_progress(run: Run, position: EpochPosition | None) -> EpochProgress:
    """Where this rank starts the epoch a mid-epoch checkpoint was taken in.

    In the layout it was taken in (ranks, loader workers, batch) every rank goes on after the
    same batch with its own partial sums: the rest of the epoch is the uninterrupted one's. In
    another (an elastic run resized, other loader workers) the loaders deal the epoch anew:
    the run skips as many batches as cover the samples trained, in whole optimizer steps, so
    the schedule and the sample count stay right, though not which samples are trained twice
    or not at all.
    """
    if position is None:
        return EpochProgress()
    batch = trained_batch_size(run)
    layout = (run.world, max(1, run.train.loader_workers), batch)
    if (position.world_size, position.loader_workers, position.batch_size) == layout:
        return EpochProgress(
            step=position.step,
            loss_sum=position.loss_sums[run.rank].to(run.device),
            samples=position.samples[run.rank],
            seconds=position.seconds[run.rank],
        )
    accumulate = run.train.accumulate_steps
    step = min(position.samples_trained // (run.world * batch), run.steps)
    step -= step % accumulate
    share = step * batch * run.world / max(1, position.samples_trained)
    loss_sum = sum(position.loss_sums, torch.zeros(())) * share / run.world
    return EpochProgress(step, loss_sum.to(run.device), step * batch, max(position.seconds))


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
    rngs = [part["rng"] for part in _gather(run.world, {"rng": rng_state(run.device)})]
    previous_best = state.best_location
    with tempfile.TemporaryDirectory() as folder:
        checkpoint_dir = None
        if run.rank == 0:
            if improved and state.best_weights is not None:
                state.best_location = write_best_weights(
                    run.config.best_weights_dir, state.epoch, state.best_weights
                )
            checkpoint_dir = Path(folder)
            write_checkpoint(checkpoint_dir, checkpoint_contents(run, state, rngs))
        run.session.report(_scalars(row), checkpoint_dir)
    if run.rank == 0 and improved:
        prune_best_weights(run.config.best_weights_dir, {previous_best, state.best_location})


def checkpoint_contents(
    run: Run,
    state: TrainingState,
    rngs: list[dict[str, Any]],
    position: EpochPosition | None = None,
) -> dict[str, Any]:
    """What `checkpoint.pt` holds (the live tensors: `snapshot` copies them)."""
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "schedule_step": run.schedule.step_count,
        "scaler": run.scaler.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "rng": rngs,
        "state": state.to_dict(),
        "position": position.to_dict() if position is not None else None,
    }


class MidEpochCheckpoints:
    """`train.checkpoint_every`: a checkpoint after an optimizer step within an epoch, when
    `clock` says so (an `AfterStep` of `train_one_epoch`). Every rank gives its part (its
    generators, its partial sums: one all-gather); rank 0 copies them with the weights,
    optimizer... and its writer thread saves the copy while training goes on
    (`mid_epoch_location`; the newest `train.checkpoints_to_keep` of them are kept, none of an
    epoch whose end is saved). History, W&B rows and the best model are left alone: they are
    per epoch.

    Also the place of the injected mid-epoch kills (`attnpipe.train.faults`)."""

    def __init__(self, run: Run, state: TrainingState, clock: CheckpointClock, vote: StopVote):
        self.run, self.state, self.clock, self.vote = run, state, clock, vote
        self.folder = mid_epoch_dir(run.config.best_weights_dir)
        writes = clock.enabled and run.rank == 0
        self.writer = CheckpointWriter(self._write) if writes else None
        self.kills = step_faults_planned()

    @property
    def active(self) -> bool:
        return self.clock.enabled or self.kills

    def __call__(self, epoch: int, step: int, progress: EpochProgress) -> None:
        run = self.run
        # Only right after an optimizer step; never after an epoch's last one (its end saves).
        boundary = (step + 1) % run.train.accumulate_steps == 0 and step + 1 < run.steps
        if boundary and self.clock.due(run.schedule.step_count, self.vote.checkpoint_wish):
            self.save(epoch, progress)
        if self.kills:
            step_fault_point(epoch + 1, step + 1, run.rank, before=self.flush)

    def save(self, epoch: int, progress: EpochProgress) -> None:
        run, state = self.run, self.state
        mine = {
            "rng": rng_state(run.device),
            "loss_sum": progress.loss_sum.detach().cpu(),
            "samples": progress.samples,
            "seconds": progress.elapsed(),
        }
        parts = _gather(run.world, mine)
        workers, batch = max(1, run.train.loader_workers), trained_batch_size(run)
        position = EpochPosition(
            epoch=epoch,
            step=progress.step,
            world_size=run.world,
            loader_workers=workers,
            batch_size=batch,
            loss_sums=[part["loss_sum"] for part in parts],
            samples=[part["samples"] for part in parts],
            seconds=[part["seconds"] for part in parts],
            readers=[
                [batches_taken(progress.step, workers, w) * batch for w in range(workers)]
                for _ in range(run.world)
            ],
        )
        if self.writer is not None:
            rngs = [part["rng"] for part in parts]
            self.writer.submit(snapshot(checkpoint_contents(run, state, rngs, position)))
        self.clock.mark_saved()

    def _write(self, payload: dict[str, Any]) -> None:
        """In the writer thread: the file, then only the newest checkpoints_to_keep."""
        position = payload["position"]
        location = mid_epoch_location(self.folder, position["epoch"], position["step"])
        write_checkpoint_file(location, payload)
        found = mid_epoch_checkpoints(self.folder)
        for _, _, old in found[: -self.run.train.checkpoints_to_keep]:
            storage.delete_file(old)

    def epoch_saved(self) -> None:
        """After an epoch's checkpoint: the mid-epoch ones of the epochs it completes go (also
        those of an earlier launch that had train.checkpoint_every on)."""
        self.clock.mark_saved()
        if self.run.rank == 0:
            for epoch, _, old in mid_epoch_checkpoints(self.folder):
                if epoch < self.state.epoch:
                    storage.delete_file(old)

    def flush(self) -> None:
        """Every mid-epoch checkpoint taken so far kept (before an epoch's end writes)."""
        if self.writer is not None:
            self.writer.flush()


def _gather(world: int, mine: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's `mine`, in rank order, on every rank (one collective)."""
    if world == 1:
        return [mine]
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    return parts


def cpu_copy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state_dict.items()}


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, int | float)}
