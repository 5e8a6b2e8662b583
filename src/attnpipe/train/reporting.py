"""What a training worker tells people: its epoch line, and trace events for debugging/tests."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnpipe.config import TrainConfig

if TYPE_CHECKING:
    from attnpipe.train.checkpoint import TrainingState
    from attnpipe.train.session import WorkerSession

# Set to a folder to have every rank write trace events and the sample ids it trained on.
TRACE_ENV = "ATTNPIPE_TRACE_DIR"


def say(line: str) -> None:
    """One line to the worker's real stdout, which Ray streams to the driver.

    Ray Train patches `print` into its logger, and W&B wraps sys.stdout; with both, a plain
    print would appear twice.
    """
    stream = sys.__stdout__ or sys.stdout
    stream.write(line + "\n")
    stream.flush()


def epoch_line(row: dict[str, Any], state: TrainingState, config: TrainConfig, eta: float) -> str:
    metric = config.monitor
    return (
        f"epoch {state.epoch}/{config.epochs}  train_loss {row['train_loss']:.4f}  "
        f"val_loss {row['val_loss']:.4f}  val_accuracy {row['val_accuracy']:.4f}  "
        f"{metric} best {state.best:.4f} (epoch {state.best_epoch})  "
        f"{row['train_images_per_s']:.0f} img/s  ETA {_duration(eta)}"
    )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclass(frozen=True)
class Tracer:
    """Where and when this rank is (`<folder>/rank<r>.jsonl`) and which samples it trained on
    (`<folder>/epoch<e>-rank<r>.txt`). Off unless ATTNPIPE_TRACE_DIR is set: for debugging
    placement and for the tests that kill a worker at a chosen epoch."""

    folder: Path | None
    rank: int
    node_id: str
    run_name: str

    @classmethod
    def from_environment(cls, session: WorkerSession, run_name: str) -> Tracer:
        folder = os.environ.get(TRACE_ENV)
        return cls(Path(folder) if folder else None, session.rank, session.node_id, run_name)

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def event(self, name: str, epoch: int) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {
            "event": name,
            "epoch": epoch,
            "run": self.run_name,
            "pid": os.getpid(),
            "node_id": self.node_id,
            "time": time.time(),
        }
        with (self.folder / f"rank{self.rank}.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def sample_ids(self, epoch: int, ids: list[str]) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"epoch{epoch}-rank{self.rank}.txt").write_text("\n".join(ids) + "\n")
