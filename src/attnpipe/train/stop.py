"""Stopping a run on request (Ctrl-C, `kill`, a preempted node, `ray job stop`) without losing it.

Ray ends a run by killing its workers, which takes whatever they hold in memory with them: the
W&B run (its transaction log is flushed only when the run finishes) and any message still on its
way. So the first Ctrl-C or SIGTERM on the driver only *asks* the workers to stop: they agree on
it every few steps, rank 0 finishes its W&B run, and every rank returns. The checkpoints of the
finished epochs stay; the same command resumes from the last one. A second signal, or a stop
that takes longer than the grace period, ends the run at once as before.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

# Seconds the workers get to stop cleanly: spot instances get 30-120 s of notice.
DEFAULT_GRACE_S = 60.0


# --------------------------------------------------------------------------- driver side
@dataclass
class StopSignal:
    """When the first stop signal arrived (monotonic seconds), if one has."""

    at: float | None = None

    @property
    def received(self) -> bool:
        return self.at is not None


@contextmanager
def stop_signals(on_first: Callable[[], None]) -> Iterator[StopSignal]:
    """Inside: the first Ctrl-C or SIGTERM calls `on_first`, a second raises KeyboardInterrupt.

    The handlers that were installed before come back on exit. Outside the main thread, which
    receives no signals, nothing is installed.
    """
    signalled = StopSignal()
    if threading.current_thread() is not threading.main_thread():
        yield signalled
        return

    def handle(signum: int, frame: Any) -> None:
        if signalled.received:
            raise KeyboardInterrupt(f"signal {signum} (second)")
        signalled.at = time.monotonic()
        on_first()

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handle)
    try:
        yield signalled
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _StopFlag:
    """A flag the driver sets and rank 0 polls (a tiny Ray actor: it reaches every node)."""

    def __init__(self) -> None:
        self._requested = False

    def request(self) -> None:
        self._requested = True

    def requested(self) -> bool:
        return self._requested


def create_stop_flag(name: str) -> Any:
    """Start the named flag actor for one run; workers find it by `name`."""
    import ray

    actor = ray.remote(num_cpus=0)(_StopFlag)
    return actor.options(name=name, get_if_exists=True).remote()


def run_stoppable(
    fit: Callable[[], T],
    request_stop: Callable[[], None],
    grace_s: float = DEFAULT_GRACE_S,
    say: Callable[[str], None] = print,
) -> tuple[T, bool]:
    """Run `fit` in a thread; the first Ctrl-C/SIGTERM calls `request_stop`, a second aborts.

    Returns what `fit` returned and whether a stop was requested meanwhile (the workers may
    still have finished the run: a request after their last check changes nothing).
    """
    if threading.current_thread() is not threading.main_thread():
        return fit(), False  # only the main thread receives signals
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fit()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    def ask_the_workers() -> None:
        say(
            f"stopping at the next step (W&B run and checkpoints are kept; up to {grace_s:.0f} s)"
            "; press Ctrl-C again to stop at once"
        )
        request_stop()

    worker = threading.Thread(target=target, name="attnpipe-fit", daemon=True)
    with stop_signals(ask_the_workers) as signalled:
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
            if signalled.received and time.monotonic() - signalled.at > grace_s:
                raise KeyboardInterrupt(f"the workers did not stop within {grace_s:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"], signalled.received


# --------------------------------------------------------------------------- worker side
class StopFlagReader:
    """Rank 0's view of the driver's flag; never asked when the run was launched without one.

    Never blocks: each call looks whether the previous question has been answered
    (`ray.wait` with no timeout) and asks again; an answer arrives one call later.
    """

    def __init__(self, name: str | None) -> None:
        self._actor = None
        self._pending: Any = None
        if name:
            import ray

            with suppress(ValueError):  # launched without one (a Tune trial): never asked
                self._actor = ray.get_actor(name)

    def requested(self) -> bool:
        if self._actor is None:
            return False
        import ray

        try:
            answer = False
            if self._pending is not None:
                ready, _ = ray.wait([self._pending], timeout=0)
                if not ready:
                    return False  # still on its way: ask again later, never wait for it
                answer = bool(ray.get(ready[0]))
            self._pending = self._actor.requested.remote()
            return answer
        except Exception:  # the driver is gone: keep training, Ray ends us if it must
            return False
