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
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# Seconds the workers get to stop cleanly: spot instances get 30-120 s of notice.
DEFAULT_GRACE_S = 60.0


class _StopRequest:
    """A flag the driver sets and rank 0 polls (a tiny Ray actor: it reaches every node)."""

    def __init__(self) -> None:
        self._requested = False

    def request(self) -> None:
        self._requested = True

    def requested(self) -> bool:
        return self._requested


def create_stop_request(name: str) -> Any:
    """Start the named flag actor for one run; workers find it by `name`."""
    import ray

    actor = ray.remote(num_cpus=0)(_StopRequest)
    return actor.options(name=name, get_if_exists=True).remote()


def stop_was_requested(name: str | None, cache: dict[str, Any]) -> bool:
    """Worker side: has the driver asked run `name` to stop? False when there is no flag."""
    if not name:
        return False
    import ray

    if "actor" not in cache:
        try:
            cache["actor"] = ray.get_actor(name)
        except ValueError:  # launched without one (a Tune trial): never asked
            cache["actor"] = None
    if cache["actor"] is None:
        return False
    try:
        return bool(ray.get(cache["actor"].requested.remote(), timeout=10))
    except Exception:  # the driver is gone or slow: keep training, Ray ends us if it must
        return False


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

    requested_at: list[float] = []

    def on_signal(signum: int, frame: Any) -> None:
        if requested_at:
            raise KeyboardInterrupt(f"signal {signum} (second)")
        requested_at.append(time.monotonic())
        say(
            f"stopping at the next step (W&B run and checkpoints are kept; up to {grace_s:.0f} s)"
            "; press Ctrl-C again to stop at once"
        )
        request_stop()

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    worker = threading.Thread(target=target, name="attnpipe-fit", daemon=True)
    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
            if requested_at and time.monotonic() - requested_at[0] > grace_s:
                raise KeyboardInterrupt(f"the workers did not stop within {grace_s:.0f} s")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"], bool(requested_at)
