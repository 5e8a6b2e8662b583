"""Follow the per-rank trace events a training run writes when ATTNPIPE_TRACE_DIR is set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def start_attnpipe(root: Path, command: str, trace: Path, **env: str) -> subprocess.Popen:
    """`attnpipe <command> digits` in a subprocess that writes its trace events to `trace`."""
    return subprocess.Popen(
        [sys.executable, "-m", "attnpipe.cli", "--root", str(root), command, "digits"],
        env={
            **os.environ,
            "ATTNPIPE_TRACE_DIR": str(trace),
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def events(folder: Path, rank: int) -> list[dict]:
    path = folder / f"rank{rank}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_epoch(folder: Path, rank: int, epoch: int, timeout: float = 300, nth: int = 1) -> dict:
    """Block until `rank` starts `epoch` for the `nth` time (a restarted worker group starts it
    again); return that event (with the worker's pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        starts = [e for e in events(folder, rank) if e["event"] == "epoch" and e["epoch"] == epoch]
        if len(starts) >= nth:
            return starts[nth - 1]
        time.sleep(0.2)
    again = f" (start number {nth})" if nth > 1 else ""
    raise TimeoutError(f"rank {rank} did not start epoch {epoch}{again} within {timeout:.0f}s")


def recorded_epoch(storage: Path) -> int:
    """The epoch of the newest checkpoint Ray Train has recorded under `storage` (0 if none).

    A worker's `report()` returns before the controller records its checkpoint; only a
    recorded checkpoint is what a restarted or re-launched run resumes from.
    """
    newest = 0
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except (json.JSONDecodeError, OSError):  # being rewritten right now
            continue
        newest = max(newest, int(latest.get("metrics", {}).get("epoch", 0)))
    return newest


def wait_for_recorded_epoch(storage: Path, epoch: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while recorded_epoch(storage) < epoch:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no checkpoint of epoch {epoch} recorded in {storage}")
        time.sleep(0.2)
