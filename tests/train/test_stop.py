"""The driver's side of a graceful stop: the first signal asks, a second one (or a timeout) ends."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from attnpipe.train.stop import run_stoppable

# Signals on timers, waits with deadlines, a grace period: all wall clock.
pytestmark = pytest.mark.timing


def _signal_soon(signum: int, delay: float = 0.3) -> None:
    threading.Timer(delay, os.kill, (os.getpid(), signum)).start()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_asks_the_workers_to_stop_and_waits_for_them(signum):
    asked = threading.Event()

    def fit() -> str:
        assert asked.wait(10), "never asked to stop"
        time.sleep(0.3)  # the workers finish their step and flush
        return "result"

    before = signal.getsignal(signum)
    messages: list[str] = []
    _signal_soon(signum)
    value, requested = run_stoppable(fit, request_stop=asked.set, say=messages.append)

    assert (value, requested) == ("result", True)
    assert "Ctrl-C again" in messages[0]
    assert signal.getsignal(signum) is before  # handlers put back


def test_a_run_that_is_not_signalled_returns_untouched():
    assert run_stoppable(lambda: 42, request_stop=lambda: None) == (42, False)


def test_second_signal_stops_at_once():
    hung = threading.Event()

    def fit() -> None:
        hung.wait(30)  # workers that never reach a stop check

    _signal_soon(signal.SIGINT, 0.2)
    _signal_soon(signal.SIGINT, 0.6)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt, match="second"):
        run_stoppable(fit, request_stop=lambda: None, say=lambda _: None)
    assert time.monotonic() - started < 10
    hung.set()


def test_workers_that_do_not_stop_within_the_grace_period_are_abandoned():
    hung = threading.Event()
    _signal_soon(signal.SIGTERM, 0.2)
    with pytest.raises(KeyboardInterrupt, match="within 1 s"):
        run_stoppable(lambda: hung.wait(30), request_stop=lambda: None, grace_s=1, say=print)
    hung.set()


def test_errors_of_the_run_reach_the_caller():
    def fit() -> None:
        raise ValueError("bad shard")

    with pytest.raises(ValueError, match="bad shard"):
        run_stoppable(fit, request_stop=lambda: None)


def test_torchrun_across_nodes_refuses_node_local_checkpoints(tmp_path):
    """Ranks on several nodes with checkpoints on each node's own disk would resume from
    different epochs and hang: refused unless the path is declared shared."""
    from attnpipe.train.torchrun import TorchrunError, check_storage

    two_nodes = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}
    with pytest.raises(TorchrunError, match=r"spans 2 or more nodes .* --shared-storage"):
        check_storage(tmp_path, shared=False, environ=two_nodes)
    check_storage(tmp_path, shared=True, environ=two_nodes)
    check_storage(tmp_path, shared=False, environ={"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"})
    check_storage(tmp_path, shared=False, environ={})
