"""Mid-epoch checkpoints (`train.checkpoint_every`): when they are due, and a writer that keeps
them off the training path.

The training thread only copies what a checkpoint holds (`snapshot`: the state_dict copy) and
goes on; rank 0's writer thread saves that copy, in the order they were taken. At most
`PENDING` checkpoints wait: when the disk or the store is slower than the interval asked for,
the training thread waits for the oldest rather than piling up copies of the weights.

They are files of their own beside the run's checkpoints (`mid_epoch_location`), not reports
to Ray Train: a report is a barrier of every rank, and Ray takes one report per worker per
health check (2 s), so reports more frequent than that would hold training up. Epoch ends
still report, in the training thread, once the writer has nothing left: their row is logged
only after their checkpoint is kept (`loop.end_epoch`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from attnpipe.config import checkpoint_interval

# Checkpoints copied but not yet kept, at most.
PENDING = 2

Write = Callable[[dict[str, Any]], None]


class CheckpointClock:
    """When a mid-epoch checkpoint is due: every `steps` optimizer steps (every rank counts the
    same), or once `seconds` have passed since the last checkpoint (each rank's own clock, so
    the ranks vote: `wish`, carried by the stop vote)."""

    def __init__(self, every: int | str | None) -> None:
        self.steps, self.seconds = checkpoint_interval(every)
        self.saved = 0  # checkpoints taken in this attempt, the same count on every rank
        self.last = time.monotonic()

    @property
    def enabled(self) -> bool:
        return self.steps is not None or self.seconds is not None

    def wish(self) -> int:
        """This rank's vote: the number of the checkpoint it asks for, or 0."""
        if self.seconds is not None and time.monotonic() - self.last >= self.seconds:
            return self.saved + 1
        return 0

    def due(self, optimizer_steps: int, agreed_wish: int) -> bool:
        """After optimizer step number `optimizer_steps` of the run, with `agreed_wish` the
        ranks' last settled vote: whether to checkpoint now (the same answer on every rank)."""
        if self.steps is not None:
            return optimizer_steps % self.steps == 0
        return agreed_wish > self.saved

    def mark_saved(self) -> None:
        """A checkpoint was taken (mid-epoch or at an epoch's end): the clock starts again."""
        self.saved += 1
        self.last = time.monotonic()


def snapshot(value: Any) -> Any:
    """A copy of a checkpoint's contents that training cannot change any more: every tensor
    copied to the CPU, every dict and list new."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: snapshot(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(snapshot(item) for item in value)
    return value


class CheckpointWriter:
    """One thread that calls `write(payload)` for each submitted payload, in order. A failure
    is raised in the training thread at its next `submit` or `flush`."""

    def __init__(self, write: Write, pending: int = PENDING) -> None:
        self._write = write
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name="attnpipe-checkpoint-writer", daemon=True
        )
        self._thread.start()

    def submit(self, payload: dict[str, Any]) -> None:
        """Queue a checkpoint (a `snapshot`); waits only while `pending` are queued already."""
        self._raise_failure()
        self._queue.put(payload)

    def flush(self) -> None:
        """Wait until every submitted checkpoint is kept."""
        self._queue.join()
        self._raise_failure()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:  # after a failure nothing more: it is raised first
                    self._write(item)
            except BaseException as error:  # re-raised in the training thread
                self._error = error
            finally:
                self._queue.task_done()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing a mid-epoch checkpoint failed: {self._error}") from (
                self._error
            )
