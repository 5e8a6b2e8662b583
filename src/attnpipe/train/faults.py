"""Injected faults: kill this worker at a named point of an epoch, for the tests that prove a
kill anywhere loses nothing and repeats nothing (no timing, no race with a killer thread).

    ATTNPIPE_FAULT_AT=<phase>:<epoch>[,<phase>:<epoch>...]  ATTNPIPE_FAULT_DIR=<folder>

Each rank that reaches a named point kills itself with SIGKILL, as a reclaimed node or the OOM
killer would: nothing is flushed or finished. Each fault fires once per rank (a marker file in
ATTNPIPE_FAULT_DIR remembers it), so the restarted or re-launched run passes the same point.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from attnpipe.errors import AttnpipeError

FAULT_ENV = "ATTNPIPE_FAULT_AT"
FAULT_DIR_ENV = "ATTNPIPE_FAULT_DIR"
# The points of an epoch's end, in the loop's order.
PHASES = ("validated", "checkpointed", "logged")


class FaultSpecError(AttnpipeError, ValueError):
    """ATTNPIPE_FAULT_AT names an unknown phase or no epoch number."""


def planned_faults(value: str | None = None) -> set[tuple[str, int]]:
    value = os.environ.get(FAULT_ENV, "") if value is None else value
    faults = set()
    for item in filter(None, (part.strip() for part in value.split(","))):
        phase, _, epoch = item.partition(":")
        if phase not in PHASES or not epoch.isdigit():
            raise FaultSpecError(
                f"{FAULT_ENV}={value!r}: each item must be <phase>:<epoch> with phase one of "
                f"{', '.join(PHASES)} (e.g. checkpointed:2)"
            )
        faults.add((phase, int(epoch)))
    return faults


def fault_point(phase: str, epoch: int, rank: int) -> None:
    """Die here if ATTNPIPE_FAULT_AT names this point and this rank has not died here yet."""
    if (phase, epoch) not in planned_faults():
        return
    folder = os.environ.get(FAULT_DIR_ENV)
    if not folder:
        raise FaultSpecError(f"{FAULT_ENV} is set: set {FAULT_DIR_ENV} to a folder too")
    marker = Path(folder) / f"fired-{phase}-{epoch}-rank{rank}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    os.kill(os.getpid(), signal.SIGKILL)
