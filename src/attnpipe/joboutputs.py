"""A cluster job's stage outputs: published to shared storage by the job, brought home here.

A stage run as a cluster job (`attnpipe submit`, a RayJob) writes its outputs into the job's
temporary working directory on the head, which nobody sees. With OUTPUTS_ENV set in its
environment, the stage also publishes them to `train.storage_path` (a folder or URL that every
node and the workstation reach), and `submit` (or `attnpipe pull`) copies them home to exactly
where a local run writes them. Layout:

    <train.storage_path>/<pipeline>/outputs/<stage>/<job id>/     one folder per job
        models/<pipeline>/model.pt, reports/<pipeline>/...,       paths as in the project
        wandb/offline-run-<time>-<run id>/...                     (W&B runs: the workspace)
        manifest.json                                             written last: complete
    <train.storage_path>/<pipeline>/outputs/<stage>/latest.json   the newest complete job

A job that fails publishes no manifest (its folder is ignored) and never moves `latest.json`.
Bringing home downloads into a temporary folder inside the project first and checks every
size, then moves each output into place (a folder output, e.g. figures/, replaces the local
one whole), so a failed download changes nothing here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from attnpipe import storage
from attnpipe.errors import AttnpipeError
from attnpipe.paths import PipelinePaths

# Set by `submit` in the job's environment (set it in a RayJob's too): publish the outputs.
OUTPUTS_ENV = "ATTNPIPE_JOB_OUTPUTS"
# The job's id, which names its outputs folder (a RayJob without it gets a time-based one).
JOB_ID_ENV = "ATTNPIPE_JOB_ID"
OUTPUTS_FOLDER = "outputs"
MANIFEST = "manifest.json"
LATEST = "latest.json"
FORMAT_VERSION = 1
PUBLISHED_STAGES = ("train", "tune", "evaluate")
# Where brought-home files may go: nothing from storage writes outside these project folders.
HOME_FOLDERS = ("models", "reports", "wandb")
STAGING_PREFIX = ".attnpipe-pull-"


class OutputsError(AttnpipeError, RuntimeError):
    """Published outputs are missing or unusable; the message says what to run."""


@dataclass(frozen=True)
class Published:
    """One job's complete outputs on storage."""

    location: str  # <storage>/<pipeline>/outputs/<stage>/<job id>
    manifest: dict[str, Any]

    @property
    def job_id(self) -> str:
        return str(self.manifest["job_id"])

    @property
    def stage(self) -> str:
        return str(self.manifest["stage"])


# --------------------------------------------------------------------------- layout
def in_job() -> bool:
    """Whether this process is a stage that a cluster job runs (and must publish)."""
    return os.environ.get(OUTPUTS_ENV) == "1"


def stage_folder(storage_path: str, pipeline: str, stage: str) -> str:
    return storage.join(storage_path, pipeline, OUTPUTS_FOLDER, stage)


def job_folder(storage_path: str, pipeline: str, stage: str, job_id: str) -> str:
    return storage.join(stage_folder(storage_path, pipeline, stage), job_id)


def stage_entries(stage: str, paths: PipelinePaths) -> list[Path]:
    """The files and folders a local run of `stage` writes (its DVC outputs, metrics, plots),
    W&B runs aside (`wandb_entries`)."""
    reports = paths.reports
    table = {
        "train": [paths.model_file, paths.train_metrics, paths.train_summary, paths.train_history],
        "evaluate": [
            paths.metrics,
            paths.test_summary,
            paths.confusion,
            paths.per_class,
            paths.figures,
            paths.report_html,
        ],
        "tune": [reports / "tune_trials.csv", reports / "best_params.yaml"],
    }
    if stage not in table:
        raise OutputsError(f"stage '{stage}' publishes no outputs; choose one of {list(table)}")
    return table[stage]


def wandb_entries(stage: str, paths: PipelinePaths) -> list[Path]:
    """The offline W&B run folders of the run the stage's record names (train.json or
    metrics.json: `wandb.run_id`); every launch of a resumed run has one."""
    record = {"train": paths.train_metrics, "evaluate": paths.metrics}.get(stage)
    if record is None or not record.is_file():
        return []
    run_id = ((json.loads(record.read_text()) or {}).get("wandb") or {}).get("run_id")
    if not run_id:
        return []
    return sorted(
        folder
        for folder in (paths.wandb_parent / "wandb").glob(f"offline-run-*-{run_id}")
        if folder.is_dir() and not folder.is_symlink()
    )


def relative_name(path: Path, paths: PipelinePaths) -> str:
    """`path` as the manifest names it: W&B runs from the workspace, the rest from the root."""
    for base in (paths.root, paths.wandb_parent):
        if path.resolve().is_relative_to(base.resolve()):
            return path.resolve().relative_to(base.resolve()).as_posix()
    raise OutputsError(f"{path} is outside the project {paths.root}")


def local_target(name: str, paths: PipelinePaths) -> Path:
    """Where a manifest's entry goes here; refuses names that would leave the project."""
    parts = PurePosixPath(name).parts
    safe = (
        len(parts) >= 2
        and not PurePosixPath(name).is_absolute()
        and ".." not in parts
        and parts[0] in HOME_FOLDERS
        and (parts[0] == "wandb" or parts[1] == paths.name)
    )
    if not safe:
        raise OutputsError(
            f"published output '{name}' is not under models/{paths.name}/, "
            f"reports/{paths.name}/ or wandb/: refusing to write it"
        )
    base = paths.wandb_parent if parts[0] == "wandb" else paths.root
    return base.joinpath(*parts)


# --------------------------------------------------------------------------- job side
def new_job_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def publish(
    stage: str,
    storage_path: str | None,
    paths: PipelinePaths,
    job_id: str | None = None,
    say: Callable[[str], None] = print,
) -> Published | None:
    """Upload the stage's outputs to their job folder, the manifest last, then `latest.json`.
    Without shared storage nothing is published (said, not raised: the stage succeeded)."""
    if not storage_path:
        say(
            f"{stage} outputs not published: train.storage_path is not set, so they stay in "
            "this job's working directory; set it to shared storage (s3://BUCKET/checkpoints)"
        )
        return None
    job_id = job_id or os.environ.get(JOB_ID_ENV) or new_job_id()
    location = job_folder(storage_path, paths.name, stage, job_id)
    entries = [p for p in stage_entries(stage, paths) if p.exists()]
    entries += wandb_entries(stage, paths)
    files: dict[str, int] = {}
    for entry in entries:
        for path in sorted(entry.rglob("*")) if entry.is_dir() else [entry]:
            if path.is_file() and not path.is_symlink():
                name = relative_name(path, paths)
                files[name] = storage.upload_file(path, storage.join(location, name))
    manifest = {
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "pipeline": paths.name,
        "job_id": job_id,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "entries": [relative_name(entry, paths) for entry in entries],
        "files": files,
    }
    _write_json(storage.join(location, MANIFEST), manifest)
    _write_json(storage.join(stage_folder(storage_path, paths.name, stage), LATEST), manifest)
    say(f"{stage} outputs ({len(files)} files) published to {location}")
    return Published(location, manifest)


def _write_json(location: str, content: dict[str, Any]) -> None:
    storage.write_bytes(location, (json.dumps(content, indent=2) + "\n").encode())


# --------------------------------------------------------------------------- home side
def find_published(
    storage_path: str, pipeline: str, stage: str, job_id: str | None = None
) -> Published | None:
    """A job's complete outputs (`job_id`), or the stage's newest; None when there are none."""
    if job_id is None:
        latest = storage.join(stage_folder(storage_path, pipeline, stage), LATEST)
        if not storage.exists(latest):
            return None
        job_id = str(json.loads(storage.read_bytes(latest))["job_id"])
    location = job_folder(storage_path, pipeline, stage, job_id)
    manifest = storage.join(location, MANIFEST)
    if not storage.exists(manifest):
        return None
    return Published(location, json.loads(storage.read_bytes(manifest)))


def bring_home(published: Published, paths: PipelinePaths) -> list[str]:
    """Copy a job's outputs to where a local run writes them; returns the entries placed.

    Everything is downloaded (and its size checked) into a staging folder in the project
    before anything local is replaced: a failed or interrupted download leaves no trace."""
    manifest = published.manifest
    entries = [str(e) for e in manifest["entries"]]
    targets = {name: local_target(name, paths) for name in entries}
    files = {str(k): int(v) for k, v in manifest["files"].items()}
    for name in files:
        local_target(name, paths)  # every file too: a manifest is data, not trusted
    paths.root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=paths.root))
    try:
        for name, size in files.items():
            got = storage.download_file(storage.join(published.location, name), staging / name)
            if got != size:
                raise OutputsError(
                    f"{published.location}/{name} has {got} bytes, the manifest says {size}: "
                    "the published outputs changed while downloading; run `attnpipe pull` again"
                )
        for name, target in targets.items():
            _move_into_place(staging / name, target, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entries


def _move_into_place(source: Path, target: Path, staging: Path) -> None:
    """Replace `target` with `source` (a file, or a whole folder: no stale files remain)."""
    if not source.exists():  # an empty folder output: nothing was downloaded for it
        source.mkdir(parents=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir() and not target.is_symlink():
        # Out of the way first (a rename, so the gap is short), deleted with the staging.
        target.rename(Path(tempfile.mkdtemp(dir=staging)) / "old")
    try:
        os.replace(source, target)
    except OSError:  # another file system (a W&B folder outside the project)
        shutil.move(str(source), str(target))


def pull(
    storage_path: str | None,
    paths: PipelinePaths,
    stages: tuple[str, ...] = PUBLISHED_STAGES,
    job_id: str | None = None,
    say: Callable[[str], None] = print,
) -> list[Published]:
    """Bring home the newest published outputs of each of `stages` (or job `job_id`'s)."""
    if not storage_path:
        raise OutputsError(
            f"train.storage_path is not set in pipelines/{paths.name}.yaml: it is where cluster "
            "jobs publish their outputs; set it (or pass --set train.storage_path=URL)"
        )
    found = [
        published
        for stage in stages
        if (published := find_published(storage_path, paths.name, stage, job_id)) is not None
    ]
    if not found:
        which = f"job {job_id}" if job_id else f"stage(s) {', '.join(stages)}"
        raise OutputsError(
            f"no published outputs of {which} under {storage.join(storage_path, paths.name)}/"
            f"{OUTPUTS_FOLDER}/: a job publishes them only when it succeeds (see `attnpipe jobs "
            "list`); submit it with `attnpipe submit`"
        )
    for published in found:
        entries = bring_home(published, paths)
        say(
            f"{published.stage} outputs of job {published.job_id} "
            f"({published.manifest.get('finished', '?')}) brought home: {', '.join(entries)}"
        )
    return found
