"""The ranks agree on a stop request without holding up a training step.

All ranks must leave at the same step, or DDP hangs: so they vote (an all-reduce of "any rank
asked?"). A blocking vote costs a host-device synchronisation and a network round trip per
check; here each check starts the vote asynchronously and reads the result of the previous
check, started `every` steps earlier and long finished. A stop therefore takes effect one check
later (`every` steps, plus at most one more for rank 0's poll of the driver's flag), the same
step on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from attnpipe.train.session import WorkerSession

# Steps between checks: a check is a tiny asynchronous all-reduce.
STOP_CHECK_STEPS = 5


@dataclass
class _Ballot:
    work: Any  # the all-reduce handle (None with one rank)
    host: torch.Tensor  # the result, copied to (pinned) host memory
    copied: Any  # CUDA event after that copy; None on CPU


class StopVote:
    def __init__(self, session: WorkerSession, every: int = STOP_CHECK_STEPS) -> None:
        self.session = session
        self.every = every
        self._ballot: _Ballot | None = None

    def due(self, step: int) -> bool:
        return (step + 1) % self.every == 0

    def check(self) -> bool:
        """Start this check's vote; whether the previous one agreed to stop."""
        agreed = self.settle()
        self._ballot = self._start(self.session.stop_requested())
        return agreed

    def settle(self) -> bool:
        """The outcome of the vote in flight (False if none); called at the same point on
        every rank (a check, or the end of an epoch)."""
        ballot, self._ballot = self._ballot, None
        if ballot is None:
            return False
        if ballot.copied is not None:
            ballot.copied.synchronize()  # waits for that old point only, not the queue
        elif ballot.work is not None:
            ballot.work.wait()
        return bool(ballot.host[0])

    def _start(self, wanted: bool) -> _Ballot:
        device = self.session.device
        flag = torch.tensor([int(wanted)], dtype=torch.int32, device=device)
        work = None
        if self.session.world_size > 1:
            work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if device.type != "cuda":
            return _Ballot(work, flag, None)
        if work is not None:
            work.wait()  # on a GPU: orders the copy after the all-reduce, the host goes on
        host = torch.empty(1, dtype=torch.int32, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return _Ballot(work, host, copied)
