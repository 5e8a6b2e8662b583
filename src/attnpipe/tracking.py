"""Experiment tracking: W&B on world rank 0, plus the plain files DVC reads.

W&B is offline by default (no account, no network); `wandb sync wandb/offline-run-*` shares a
run later. Nothing secret enters a run's config: the recipe holds no credentials, and the
environment is never logged.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


# Set by DVC for the stages of `dvc exp run` (queued or not): the experiment's name and the
# commit it started from (dvc/repo/experiments/queue/base.py). Absent under `dvc repro`.
DVC_EXP_NAME_ENV = "DVC_EXP_NAME"
DVC_EXP_BASELINE_ENV = "DVC_EXP_BASELINE_REV"


@dataclass(frozen=True)
class ExperimentIdentity:
    """The DVC experiment a stage runs in (both None outside `dvc exp run`)."""

    name: str | None = None
    baseline_rev: str | None = None

    @property
    def tags(self) -> list[str]:
        """W&B tags (at most 64 characters each) that find the run from `dvc exp show`."""
        tags = [f"dvc-exp:{self.name}"[:64]] if self.name else []
        return tags + ([f"dvc-baseline:{self.baseline_rev[:10]}"] if self.baseline_rev else [])

    def as_config(self) -> dict[str, str | None]:
        return {"name": self.name, "baseline_rev": self.baseline_rev}

    def run_id_suffix(self) -> str:
        """Appended to a W&B run id: experiments never share a run, even with equal settings."""
        return "-" + re.sub(r"[^A-Za-z0-9_-]", "_", self.name) if self.name else ""


def experiment_identity(environ: Mapping[str, str] | None = None) -> ExperimentIdentity:
    """Which `dvc exp run` experiment this process belongs to, from DVC's variables."""
    environ = os.environ if environ is None else environ
    return ExperimentIdentity(
        environ.get(DVC_EXP_NAME_ENV) or None, environ.get(DVC_EXP_BASELINE_ENV) or None
    )


def wandb_run_folder(wandb_parent: Path, run_id: str) -> Path | None:
    """The newest local folder of W&B run `run_id` under `<wandb_parent>/wandb/` (offline or
    online; a resumed run has one per launch), or None."""
    found = sorted((wandb_parent / "wandb").glob(f"*run-*-{run_id}"))
    return found[-1] if found else None


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
    """A thin handle on a W&B run; every method is a no-op when tracking is disabled."""

    def __init__(self, run: Any | None):
        self.run = run

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
        tags: Sequence[str] = (),
    ) -> WandbRun:
        """`system_metrics`: W&B's CPU/GPU sampling (on for GPU runs, where utilisation and
        memory are worth watching; off on CPU, where it only takes time from training)."""
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
            tags=list(tags) or None,
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
        return cls(run)

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
        if self.run:
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
