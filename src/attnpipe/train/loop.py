"""The per-worker training loop: single-process PyTorch with the distributed parts named.

Ray starts one copy per worker (`train_loop_per_worker`); `torchrun` can run the same
`run_training` (`attnpipe.train.torchrun`). Phases, each in a module of its own:

    run = build(config, session)        model, DDP, optimizer, schedule, data (`build`)
    state = resume(run)                  the latest checkpoint of this run (`checkpointing`),
                                         at an epoch's end or within one
    if state.finished: finish            an early-stopped or finished run trains nothing more
    for each epoch:
        train_one_epoch(run, epoch)      this rank's share of the shards; equal steps per rank
                                         (`steps`); with train.checkpoint_every, mid-epoch
                                         checkpoints written by a thread (`MidEpochCheckpoints`)
        validate(run)                    every validation sample once, counts added over ranks
                                         (`validation`; meanwhile the loader workers read the
                                         next epoch)
        save_checkpoint(run, state)      rank 0 writes, every rank reports (a barrier)
        tracker.log_epoch(row)           rank 0's W&B row: only after its checkpoint
    finish(run, state)                   W&B summary, model artifact, offline run kept, and
                                         the run's end recorded (`finished`): launched again,
                                         the driver finds it there without starting Ray

A restarted worker group, or a re-launched run, continues from the latest checkpoint. A row
never outruns its checkpoint, and a resumed attempt logs exactly the rows W&B does not hold
yet (`WandbRun.logged_steps`): a kill at any point leaves every epoch once in W&B and in the
history (tests/train/test_fault_points.py kills at each point, via `attnpipe.train.faults`).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from attnpipe.tracking import WandbRun, artifact_aliases, export_wandb_run
from attnpipe.train.build import Run, build
from attnpipe.train.checkpoint import TrainingState, load_best_weights, write_best_model
from attnpipe.train.checkpoint_writer import CheckpointClock
from attnpipe.train.checkpointing import MidEpochCheckpoints, cpu_copy, resume, save_checkpoint
from attnpipe.train.faults import fault_point
from attnpipe.train.finished import already_finished, forget_finished, record_finished
from attnpipe.train.loop_config import LoopConfig
from attnpipe.train.repeatability import apply_determinism
from attnpipe.train.reporting import epoch_line, say
from attnpipe.train.session import RaySession, WorkerSession
from attnpipe.train.steps import EpochOutcome, epoch_batches, train_one_epoch
from attnpipe.train.stop_vote import StopVote
from attnpipe.train.validation import epoch_row, overlays_if_last_epoch, validate


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point: one call per worker."""
    loop: LoopConfig = config["loop"]
    # First thing in the worker: cuBLAS reads its workspace setting when CUDA starts.
    apply_determinism(loop.recipe.train.deterministic)
    run_training(loop, RaySession(stop_name=loop.stop_name, use_gpu=loop.use_gpu))


def run_training(config: LoopConfig, session: WorkerSession) -> None:
    """The loop itself, for any launcher that provides a `WorkerSession`."""
    run = build(config, session)
    state, progress = resume(run)
    tracker = start_tracking(run)
    for row in state.history:  # rows an earlier attempt checkpointed but W&B never got
        tracker.log_epoch(row, step=row["epoch"])
    run.tracer.event("start", state.epoch)  # where this attempt starts: after the last saved
    if state.finished(run.train):
        # A re-launch of a run that ended (dvc repro after a failed upload, a re-submitted job):
        # training on would change the best model it already chose.
        if run.rank == 0:
            say(already_finished(state, run.train.early_stopping_patience))
        finish(run, state, tracker)
        return
    if run.rank == 0:
        forget_finished(run.config.best_weights_dir)
    clock = (time.perf_counter(), state.epoch)
    checkpoint_clock = CheckpointClock(run.train.checkpoint_every)
    vote = StopVote(session, checkpoint_wish=checkpoint_clock.wish)
    checkpoints = MidEpochCheckpoints(run, state, checkpoint_clock, vote)
    after_step = checkpoints if checkpoints.active else None
    batches = epoch_batches(run, state.epoch, progress.step)
    first_epoch = state.epoch
    for epoch in range(first_epoch, run.train.epochs):
        resumed = progress if epoch == first_epoch else None  # its part from a mid-epoch resume
        outcome = train_one_epoch(run, epoch, batches, vote, resumed, after_step)
        checkpoints.flush()  # the epoch's end is checkpointed after its middle
        if outcome.stopped:
            stop_on_request(run, state, tracker, epoch + 1)
            return
        if epoch + 1 < run.train.epochs:
            # The loader workers read the next epoch's first batches while validation runs.
            batches = epoch_batches(run, epoch + 1)
        run.tracer.event("validate", epoch + 1)
        val = validate(run)
        end_epoch(run, state, tracker, epoch_row(run, epoch + 1, outcome, val), outcome, clock)
        checkpoints.epoch_saved()
        if vote.settle():  # asked since the last check of the epoch: it is saved, stop now
            stop_on_request(run, state, tracker, epoch + 2)
            return
        if state.should_stop(run.train.early_stopping_patience):
            if run.rank == 0:
                say(
                    f"early stopping: {run.train.monitor} did not improve for "
                    f"{run.train.early_stopping_patience} epochs"
                )
            break
    finish(run, state, tracker)


def end_epoch(
    run: Run,
    state: TrainingState,
    tracker: WandbRun,
    row: dict[str, Any],
    outcome: EpochOutcome,
    clock: tuple[float, int],
) -> None:
    """Record the epoch, checkpoint it, then log its row: in that order, so that a kill
    between the two leaves a checkpoint whose row the next attempt logs, never a row whose
    epoch is trained again."""
    state.epoch = row["epoch"]
    state.samples_seen += outcome.samples * run.world
    improved = state.record(row, run.train.monitor)
    if improved and run.rank == 0:  # only rank 0 writes them
        state.best_weights = cpu_copy(run.eval_model.state_dict())
    fault_point("validated", state.epoch, run.rank)
    run.tracer.event("checkpoint", state.epoch)
    save_checkpoint(run, state, row, improved)
    fault_point("checkpointed", state.epoch, run.rank)
    images = overlays_if_last_epoch(run, state, tracker)
    tracker.log_epoch(row, step=state.epoch, images={"val/attention_overlays": images})
    if run.rank == 0:
        started, first_epoch = clock
        per_epoch = (time.perf_counter() - started) / (state.epoch - first_epoch)
        say(epoch_line(row, state, run.train, per_epoch * (run.train.epochs - state.epoch)))
    fault_point("logged", state.epoch, run.rank)


# --------------------------------------------------------------------------- tracking
def start_tracking(run: Run) -> WandbRun:
    """World rank 0's W&B run (a no-op handle on the other ranks), with the shards as input."""
    if run.rank != 0:
        return WandbRun(None)
    config = run.config
    name = config.run_name
    if config.experiment_name:  # the name `dvc exp show` lists it under
        name = f"{config.experiment_name} ({config.run_name})"
    tracker = WandbRun.start(
        config.recipe.tracking.wandb,
        run_id=config.wandb_run_id,
        name=name,
        tags=config.wandb_tags,
        directory=Path(config.wandb_parent),
        run_config=config.run_config,
        # Its own group unless a sweep's: evaluate and export join it there.
        group=config.wandb_group or config.wandb_run_id,
        system_metrics=run.device.type == "cuda",
        job_type="train",
        export=config.wandb_export,
    )
    tracker.use_data(config.recipe.name, config.shards, config.run_config["data_version"])
    return tracker


def stop_on_request(run: Run, state: TrainingState, tracker: WandbRun, epoch: int) -> None:
    if run.rank == 0:
        say(
            f"stopped on request in epoch {epoch}; the checkpoint of epoch {state.epoch} is "
            "kept: run the same command again to resume"
        )
        _finish_wandb(run, tracker, preempted=True)


def finish(run: Run, state: TrainingState, tracker: WandbRun) -> None:
    """Rank 0: the best epoch's numbers as the W&B summary, model.pt (the same file the driver
    writes, usable by `predict` as downloaded) as a model artifact, then the run's end recorded
    for a relaunch (`attnpipe.train.finished`)."""
    if run.rank != 0:
        return
    if tracker.run is not None and load_best_weights(state) is not None:
        tracker.summarise_best(next(r for r in state.history if r["epoch"] == state.best_epoch))
        with tempfile.TemporaryDirectory() as folder:
            model_file = Path(folder) / "model.pt"
            write_best_model(model_file, run.config, state, run.classes)
            settings = run.config.run_config
            tracker.log_model(
                model_file,
                name=f"model-{run.config.run_name}",
                metadata={"epoch": state.best_epoch, run.train.monitor: state.best},
                aliases=artifact_aliases(
                    "best", settings.get("git_commit"), run.config.experiment_name
                ),
            )
    _finish_wandb(run, tracker, preempted=False)
    record_finished(run.config.best_weights_dir, state, run.config.wandb_run_id)


def _finish_wandb(run: Run, tracker: WandbRun, preempted: bool) -> None:
    run_dir = tracker.directory
    tracker.finish(preempted=preempted)
    if run_dir is None or run.recipe.tracking.wandb.mode != "offline":
        return
    if run.config.wandb_export:  # set for offline runs with explicit storage
        # This node may be gone soon (autoscalers remove idle nodes): keep the run beside the
        # checkpoints, from where the driver copies it back.
        kept = export_wandb_run(run_dir, run.config.wandb_export)
        say(f"W&B offline run kept at {kept}")
    say(f"W&B offline run: {run_dir}  (share it: wandb sync {run_dir})")
