"""Process pools for the data stages' CPU work (scan, shard, image copies)."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor


def process_pool(workers: int, preload: str) -> ProcessPoolExecutor:
    """`workers` processes started from a fork server, not forked from this process.

    A fork copies this process mid-state: threads of Ray, W&B, a test's S3 server or torch's
    thread pool may hold a lock in the allocator at that moment, and the child then crashes
    ("double free or corruption", seen when `shard` ran inside a test process). The fork server
    is a fresh process that imports `preload` (the module of the pool's function) once, so
    every worker starts from it in milliseconds instead of importing it again.
    """
    context = multiprocessing.get_context("forkserver")
    # The stdlib keeps one fork server per process: its preload list is process-wide, and
    # applies when the server starts (the first pool of this process).
    context.set_forkserver_preload([preload])
    return ProcessPoolExecutor(workers, mp_context=context)
