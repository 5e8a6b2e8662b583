"""Experiment tracking: W&B on world rank 0, plus the plain files DVC reads.

W&B is offline by default (no account, no network); `wandb sync wandb/offline-run-*` shares a
run later. Nothing secret enters a run's config: the recipe holds no credentials, and the
environment is never logged.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import struct
import subprocess
from pathlib import Path
from typing import Any

import yaml

from attnpipe import storage
from attnpipe.config import WandbConfig

# Seconds between writes of an offline (and online) run's `.wandb` file.
FLUSH_INTERVAL_S = 1.0
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")


# What `dvc repro` itself rewrites: DVC deletes a stage's outputs before running it (the
# git-tracked reports/ files included) and updates dvc.lock and .gitignore files. Changes there
# say nothing about the source, so they do not make a commit "dirty".
PIPELINE_WRITTEN = (":(exclude)dvc.lock", ":(exclude)reports", ":(exclude,glob)**/.gitignore")


def git_commit(root: Path) -> str:
    """The checked-out commit, with '-dirty' when tracked files other than the pipeline's own
    outputs changed (see PIPELINE_WRITTEN), or 'unknown' outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *PIPELINE_WRITTEN],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def data_version(root: Path, pipeline: str, shards_dir: Path | str) -> str:
    """The shards' DVC hash from dvc.lock; without DVC, a hash of the shard index.

    `shards_dir` may be a URL (the published shards): the index is read from there.
    """
    lock = root / "dvc.lock"
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for out in stages.get(f"shard@{pipeline}", {}).get("outs", []):
            if out.get("md5"):
                return f"dvc:{out['md5']}"
    try:
        blob = storage.read_bytes(storage.join(shards_dir, "index.json"))
    except FileNotFoundError:
        return "unknown"
    return "index:" + hashlib.sha256(blob).hexdigest()[:16]


def redact(value: Any) -> Any:
    """Drop entries whose key looks like a secret, at any depth."""
    if isinstance(value, dict):
        return {
            k: redact(v)
            for k, v in value.items()
            if not any(marker in str(k).upper() for marker in SECRET_MARKERS)
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


class WandbRun:
    """A thin handle on a W&B run; every method is a no-op when tracking is disabled.

    `logged_steps`: the steps this W&B run already holds from earlier attempts (see
    `logged_steps`); `log` skips them, so a resumed attempt never logs an epoch twice.
    """

    def __init__(self, run: Any | None, logged_steps: set[int] | None = None):
        self.run = run
        self.logged_steps: set[int] = set(logged_steps or ())

    @classmethod
    def start(
        cls,
        config: WandbConfig,
        run_id: str,
        name: str,
        directory: Path,
        run_config: dict,
        group: str | None = None,
        system_metrics: bool = False,
        export: str | None = None,
    ) -> WandbRun:
        """`system_metrics`: W&B's CPU/GPU sampling (on for GPU runs, where utilisation and
        memory are worth watching; off on CPU, where it only takes time from training).
        `export`: where offline runs of this id are kept (their steps count as logged)."""
        if config.mode == "disabled":
            return cls(None)
        mode = config.mode
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
            print("W&B: online mode asked for but no WANDB_API_KEY or ~/.netrc entry: offline")
            mode = "offline"
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=config.project,
            entity=config.entity,
            id=run_id,
            name=name,
            group=group,
            dir=str(directory),
            mode=mode,
            resume="allow",
            config=redact(run_config),
            settings=wandb.Settings(
                console="off",
                x_disable_stats=not system_metrics,
                silent=True,
                # Write the run's file every second, not every 15 s: a worker killed without
                # warning keeps every row logged more than a second before.
                x_transaction_log_flush_interval=FLUSH_INTERVAL_S,
            ),
        )
        return cls(run, logged_steps=logged_steps(directory / "wandb", run_id, export))

    @property
    def directory(self) -> Path | None:
        return Path(self.run.dir).parent if self.run else None

    def log(
        self,
        metrics: dict[str, Any],
        step: int,
        images: dict[str, list[tuple[Any, str]]] | None = None,
    ) -> None:
        """One history row, committed at once: W&B otherwise holds a row back until the next
        step, and a worker killed meanwhile (a dead node, a restart) would lose it.

        `images`: key -> (image, caption) pairs, logged in the same row (keys without pairs
        are left out).
        """
        if self.run and step not in self.logged_steps:
            self.logged_steps.add(step)
            row = dict(metrics)
            media = {key: pairs for key, pairs in (images or {}).items() if pairs}
            if media:
                import wandb

                row |= {
                    key: [wandb.Image(image, caption=caption) for image, caption in pairs]
                    for key, pairs in media.items()
                }
            self.run.log(row, step=step, commit=True)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run:
            self.run.summary.update(values)

    def log_model(self, path: Path, name: str, metadata: dict) -> None:
        if self.run:
            import wandb

            artifact = wandb.Artifact(name, type="model", metadata=redact(metadata))
            artifact.add_file(str(path))
            self.run.log_artifact(artifact)

    def finish(self, preempted: bool = False) -> None:
        """End the run; `preempted`: stopped on request, to be resumed (W&B shows it so)."""
        if self.run:
            if preempted:
                self.run.mark_preempting()
            self.run.finish(exit_code=130 if preempted else 0)
            self.run = None


WANDB_EXPORT_FOLDER = "wandb"


def logged_steps(wandb_dir: Path, run_id: str, export: str | None = None) -> set[int]:
    """The history steps that the offline files of W&B run `run_id` under `wandb_dir` (and
    those kept under `<export>/wandb/`) hold: what earlier attempts of a resumed run logged and
    W&B wrote to disk. A row still in a killed process's memory is not there, and is logged
    again."""
    blobs = [p.read_bytes() for p in sorted(wandb_dir.glob(f"*-{run_id}/run-{run_id}.wandb"))]
    if export:
        source = storage.join(export, WANDB_EXPORT_FOLDER)
        blobs += [
            storage.read_bytes(storage.join(source, relative))
            for relative in storage.list_tree(source)
            if relative.endswith(f"/run-{run_id}.wandb")
        ]
    steps: set[int] = set()
    for blob in blobs:
        steps |= _history_steps(blob)
    return steps


_BLOCK = 32 * 1024  # W&B's run file: LevelDB-style log of 32 KiB blocks after a 7-byte header


def _history_steps(blob: bytes) -> set[int]:
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    steps, position, pending = set(), 7, b""
    while position + 7 <= len(blob):
        if _BLOCK - position % _BLOCK < 7:  # no room for a chunk header: padding
            position += _BLOCK - position % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", blob[position : position + 7])
        if position + 7 + length > len(blob):  # cut off by a kill mid-write
            break
        pending += blob[position + 7 : position + 7 + length]
        position += 7 + length
        if kind not in (1, 4):  # 2 first, 3 middle: the record goes on; 0: padding
            pending = pending if kind in (2, 3) else b""
            continue
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(pending)
        except DecodeError:
            continue
        finally:
            pending = b""
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                if (item.key or "/".join(item.nested_key)) == "_step":
                    steps.add(int(json.loads(item.value_json)))
    return steps


def export_wandb_run(run_dir: Path, destination: str) -> str:
    """Copy a finished offline run folder to `<destination>/wandb/<folder name>/` (a URL or a
    shared path); returns where it went."""
    target = storage.join(destination, WANDB_EXPORT_FOLDER, run_dir.name)
    for path in sorted(run_dir.rglob("*")):
        if path.is_file():
            storage.upload_file(path, storage.join(target, *path.relative_to(run_dir).parts))
    return target


def import_wandb_runs(storage_location: str, wandb_parent: Path) -> list[Path]:
    """Copy the offline runs kept under `<storage>/wandb/` into `<wandb_parent>/wandb/` (the
    driver's project), skipping files already there with the same size."""
    source = storage.join(storage_location, WANDB_EXPORT_FOLDER)
    copied = []
    for relative, size in storage.list_tree(source).items():
        target = wandb_parent / "wandb" / relative
        if target.is_file() and target.stat().st_size == size:
            continue
        storage.download_file(storage.join(source, relative), target)
        copied.append(target)
    return copied


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    """The per-epoch numbers as CSV (DVC plots); columns in first-seen order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in history:
        columns.extend(k for k in row if k not in columns)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow({k: _fmt(row.get(k)) for k in columns})


def read_history(path: Path) -> list[dict[str, str]]:
    """The rows `write_history` wrote (values as text); empty when the file does not exist."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value
