"""Two real gloo ranks for a test: rank 0 in the test process, rank 1 in a spawned one.

Each spawned process imports torch and the test module afresh (seconds of CPU on a 2-core
machine); running rank 0 here instead of in a second child halves that, and the two ranks are
still two processes talking through gloo. Spawned, not forked: the test process has threads
(pytest-xdist's), and a child forked from it can hang on a lock one of them held.
"""

from __future__ import annotations

import multiprocessing
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist

# What a rank waits for the other (the rendezvous, each collective) before it fails: rank 0
# runs in the test process, where a child that died would otherwise leave it waiting for
# gloo's default of 30 minutes. Under the stop-vote test's 120 s limit; a spawned child takes
# tens of seconds to import on a busy machine.
RANK_TIMEOUT = timedelta(seconds=110)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_two_ranks(rank: Callable[..., None], *args: object) -> None:
    """`rank(r, *args)` for r = 0 here and r = 1 in a spawned process; fails if either does."""
    child = multiprocessing.get_context("spawn").Process(target=rank, args=(1, *args))
    child.start()
    try:
        rank(0, *args)
    finally:
        child.join(RANK_TIMEOUT.total_seconds())
        if child.is_alive():
            child.terminate()
            child.join()
    assert child.exitcode == 0, f"rank 1 failed (exit code {child.exitcode}; its error above)"


@contextmanager
def gloo_group(rank: int, port: int) -> Iterator[None]:
    """This process as `rank` of a two-rank gloo group on 127.0.0.1:`port`, for the block."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=RANK_TIMEOUT
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
