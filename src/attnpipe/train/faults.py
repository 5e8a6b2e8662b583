"""Injected faults: kill this worker at a named point of an epoch, for the tests that prove a
kill anywhere loses nothing and repeats nothing (no timing, no race with a killer thread).

    ATTNPIPE_FAULT_AT=<phase>:<epoch>[,<phase>:<epoch>...]  ATTNPIPE_FAULT_DIR=<folder>
    ATTNPIPE_FAULT_AT=trained:<epoch>.<step>[@<rank>]     in the middle of an epoch

Each rank that reaches a named point kills itself with SIGKILL, as a reclaimed node or the OOM
killer would: nothing is flushed or finished. Each fault fires once per rank (a marker file in
ATTNPIPE_FAULT_DIR remembers it), so the restarted or re-launched run passes the same point.

`trained:2.7@1`: rank 1 (every rank without `@`) dies after the 7th training batch of epoch 2
(both counted from 1). Rank 0 first waits for its writer thread to keep the mid-epoch
checkpoints taken before that point, so that where the run resumes does not depend on timing
(kill rank 0 for that guarantee; another rank does not wait for rank 0's writer).
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

from attnpipe.errors import AttnpipeError

FAULT_ENV = "ATTNPIPE_FAULT_AT"
FAULT_DIR_ENV = "ATTNPIPE_FAULT_DIR"
# The points of an epoch's end, in the loop's order.
PHASES = ("validated", "checkpointed", "logged")
# After a training step: trained:<epoch>.<step>[@<rank>].
STEP_PHASE = "trained"
_STEP_POINT = re.compile(r"^(\d+)\.(\d+)(?:@(\d+))?$")


class FaultSpecError(AttnpipeError, ValueError):
    """ATTNPIPE_FAULT_AT names an unknown phase or no epoch number."""


def planned_faults(value: str | None = None) -> set[tuple[str, int]]:
    value = os.environ.get(FAULT_ENV, "") if value is None else value
    faults = set()
    for item in filter(None, (part.strip() for part in value.split(","))):
        phase, _, epoch = item.partition(":")
        if phase == STEP_PHASE and _STEP_POINT.match(epoch):
            continue  # planned_step_faults
        if phase not in PHASES or not epoch.isdigit():
            raise FaultSpecError(
                f"{FAULT_ENV}={value!r}: each item must be <phase>:<epoch> with phase one of "
                f"{', '.join(PHASES)} (e.g. checkpointed:2), or {STEP_PHASE}:<epoch>.<step> "
                "with @<rank> if one rank only (e.g. trained:2.7@1)"
            )
        faults.add((phase, int(epoch)))
    return faults


def planned_step_faults(value: str | None = None) -> set[tuple[int, int, int | None]]:
    """(epoch, step, rank or None for every rank) of each `trained:` item."""
    value = os.environ.get(FAULT_ENV, "") if value is None else value
    planned_faults(value)  # refuses a malformed item, whichever kind
    faults = set()
    for item in filter(None, (part.strip() for part in value.split(","))):
        phase, _, point = item.partition(":")
        match = _STEP_POINT.match(point)
        if phase == STEP_PHASE and match:
            rank = int(match.group(3)) if match.group(3) is not None else None
            faults.add((int(match.group(1)), int(match.group(2)), rank))
    return faults


def step_faults_planned() -> bool:
    """Whether this run has mid-epoch kills planned (else the step loop never asks)."""
    return bool(planned_step_faults())


def step_fault_point(epoch: int, step: int, rank: int, before: Callable[[], None]) -> None:
    """Die after training step `step` of epoch `epoch` (both from 1) if a `trained:` item names
    it and this rank, once `before()` returned (the mid-epoch checkpoints kept)."""
    for planned_epoch, planned_step, planned_rank in planned_step_faults():
        if (planned_epoch, planned_step) == (epoch, step) and planned_rank in (None, rank):
            _die(f"{STEP_PHASE}-{epoch}.{step}", rank, before)


def fault_point(phase: str, epoch: int, rank: int) -> None:
    """Die here if ATTNPIPE_FAULT_AT names this point and this rank has not died here yet."""
    if (phase, epoch) not in planned_faults():
        return
    _die(f"{phase}-{epoch}", rank)


def _die(point: str, rank: int, before: Callable[[], None] | None = None) -> None:
    folder = os.environ.get(FAULT_DIR_ENV)
    if not folder:
        raise FaultSpecError(f"{FAULT_ENV} is set: set {FAULT_DIR_ENV} to a folder too")
    marker = Path(folder) / f"fired-{point}-rank{rank}"
    if marker.exists():
        return
    if before is not None:
        before()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    os.kill(os.getpid(), signal.SIGKILL)
