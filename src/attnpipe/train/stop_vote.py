"""The ranks agree on a stop request without holding up a training step.

All ranks must leave at the same step, or DDP hangs: so they vote (an all-reduce of "any rank
asked?"). A blocking vote costs a host-device synchronisation and a network round trip per
check; here each check starts the vote asynchronously and reads the result of the previous
check, started `every` steps earlier and long finished. A stop therefore takes effect one check
later (`every` steps, plus at most one more for rank 0's poll of the driver's flag), the same
step on every rank.

Every epoch also ends with a vote (`close_epoch`), read once the epoch is validated and saved
(`settle`): a request made in an epoch's last steps, or in an epoch of fewer than `every`
steps, stops the run at that epoch's end instead of never.

The same ballot carries the ranks' wish for a timed mid-epoch checkpoint (`train.
checkpoint_every: 15m`): each rank's clock is its own, so they agree the same way, and the
checkpoint is taken at the same step on every rank. A wish names the checkpoint it asks for
(the count of checkpoints saved, plus one), so a wish voted before that checkpoint was saved
never asks for another.

On a GPU the ballot goes up from pinned host memory without blocking (a plain
`torch.tensor(..., device="cuda")` copies from pageable memory: the host waits for every
kernel queued before it), and comes back through pinned memory behind a CUDA event.
"""

from __future__ import annotations

from collections.abc import Callable
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

    def agreed(self) -> tuple[bool, int]:
        """(stop, the checkpoint wished for: 0 for none), the maximum over the ranks."""
        if self.copied is not None:
            self.copied.synchronize()  # waits for that old point only, not the queue
        elif self.work is not None:
            self.work.wait()
        return bool(self.host[0]), int(self.host[1])


class StopVote:
    def __init__(
        self,
        session: WorkerSession,
        every: int = STOP_CHECK_STEPS,
        checkpoint_wish: Callable[[], int] | None = None,
    ) -> None:
        self.session = session
        self.every = every
        self._ballots: list[_Ballot] = []  # in flight: at most a check's and the epoch end's
        self._wish = checkpoint_wish or (lambda: 0)
        self.checkpoint_wish = 0  # what the last settled votes wished for, over all ranks

    def due(self, step: int) -> bool:
        return (step + 1) % self.every == 0

    def check(self) -> bool:
        """Start this check's vote; whether the votes in flight agreed to stop."""
        agreed = self.settle()
        self._ballots.append(self._start(self.session.stop_requested(), self._wish()))
        return agreed

    def close_epoch(self) -> None:
        """After an epoch's last step: a vote of its own, read by `settle` once the epoch is
        saved, so that every epoch, however short, asks (nothing waits here)."""
        self._ballots.append(self._start(self.session.stop_requested(), self._wish()))

    def settle(self) -> bool:
        """Whether any vote in flight agreed to stop (False if none); called at the same point
        on every rank (a check, or the end of an epoch)."""
        ballots, self._ballots = self._ballots, []
        votes = [ballot.agreed() for ballot in ballots]  # every one read: none left over
        self.checkpoint_wish = max((wish for _, wish in votes), default=0)
        return any(stop for stop, _ in votes)

    def _start(self, wanted: bool, wish: int) -> _Ballot:
        device = self.session.device
        on_gpu = device.type == "cuda"
        ask = torch.tensor([int(wanted), wish], dtype=torch.int32, pin_memory=on_gpu)
        flag = ask.to(device, non_blocking=True)
        work = None
        if self.session.world_size > 1:
            work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if not on_gpu:
            return _Ballot(work, flag, None)
        if work is not None:
            work.wait()  # on a GPU: orders the copy after the all-reduce, the host goes on
        host = torch.empty(2, dtype=torch.int32, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return _Ballot(work, host, copied)
