"""Follow the per-rank trace events a training run writes when ATTNPIPE_TRACE_DIR is set."""

from __future__ import annotations

import json
import time
from pathlib import Path


def events(folder: Path, rank: int) -> list[dict]:
    path = folder / f"rank{rank}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_epoch(folder: Path, rank: int, epoch: int, timeout: float = 300) -> dict:
    """Block until `rank` starts `epoch`; return that event (with the worker's pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in events(folder, rank):
            if event["event"] == "epoch" and event["epoch"] == epoch:
                return event
        time.sleep(0.2)
    raise TimeoutError(f"rank {rank} did not start epoch {epoch} within {timeout:.0f}s")
