"""Read an offline W&B run (`run-<id>.wandb`) back: its records, history rows and config.

The file is W&B's LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then
32 KiB blocks of chunks, each with a 7-byte header (CRC, little-endian length, type: 1 full,
2 first, 3 middle, 4 last) around serialized `wandb_internal_pb2.Record` messages.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, records, pending = 7, [], b""
    while position + 7 <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < 7:  # too small for a chunk header: padding
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        else:  # LAST
            pending += chunk
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending = b""
    return records


def history_rows(records: list[wandb_internal_pb2.Record]) -> list[dict]:
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def run_config(records: list[wandb_internal_pb2.Record]) -> dict:
    config: dict = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            items = record.run.config.update
        elif kind == "config":
            items = record.config.update
        else:
            continue
        for item in items:
            key = item.key or "/".join(item.nested_key)
            config[key] = json.loads(item.value_json)
    return config


def run_ids(records: list[wandb_internal_pb2.Record]) -> set[str]:
    return {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"}


def summary(records: list[wandb_internal_pb2.Record]) -> dict:
    """The run's summary as W&B ends it: every summary update in order (nested keys joined
    with '/', so a logged table or chart appears as `<key>/_type` etc.)."""
    values: dict = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                values[key] = json.loads(item.value_json)
    return values


def artifacts(records: list[wandb_internal_pb2.Record]) -> list:
    """The artifact records (name, type, aliases, manifest, use_after_commit)."""
    return [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]


def run_info(records: list[wandb_internal_pb2.Record]):
    """The last run record: id, group, job type, tags as the run ends."""
    return [r.run for r in records if r.WhichOneof("record_type") == "run"][-1]


def exit_code(records: list[wandb_internal_pb2.Record]) -> int | None:
    """The run's exit code; None when the file has no exit record (a killed run: W&B shows
    it as crashed)."""
    exits = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    return exits[-1].exit_code if exits else None


@dataclass(frozen=True)
class OfflineRun:
    folder: Path
    records: list

    @property
    def info(self):
        return run_info(self.records)


def offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    """Every offline run folder under `wandb_dir`, oldest first (the order `wandb sync`
    replays them in; a run resumed offline has one folder per session)."""
    files = sorted(wandb_dir.glob("offline-run-*/run-*.wandb"))
    return [OfflineRun(f.parent, read_records(f)) for f in files]


def final_state(runs: list[OfflineRun], run_id: str) -> OfflineRun:
    """The latest session of `run_id`: what W&B shows once every folder is synced."""
    sessions = [r for r in runs if r.info.run_id == run_id]
    assert sessions, f"no offline run {run_id}"
    return sessions[-1]


def finished_runs(wandb_dir: Path, count: int | None = None, timeout: float = 60.0) -> list:
    """The offline runs under `wandb_dir` once `count` of them (default: every one found) hold
    their exit record: W&B's service writes the run file on its own, and may still be at it when
    `finish()` returns. Returns what is there at `timeout`, for the caller's asserts to name."""
    deadline = time.monotonic() + timeout
    while True:
        runs = offline_runs(wandb_dir)
        done = [run for run in runs if exit_code(run.records) is not None]
        wanted = len(runs) if count is None else count
        if (runs and len(done) >= wanted) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)
