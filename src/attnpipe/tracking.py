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
import re
import struct
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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


def _forget_service_address() -> None:
    """Every process that logs owns its W&B service. wandb.init leaves its service's address
    in WANDB_SERVICE for child processes to share; a child killed mid-run (a spot node, a
    fault) then leaves its run open in the parent's service, and the relaunch is refused with
    "run ID ... is in use". So no address is taken from a parent, nor handed to children."""
    os.environ.pop("WANDB_SERVICE", None)


class WandbRun:
    """A thin handle on a W&B run; every method is a no-op when tracking is disabled.

    `logged_steps`: the steps this W&B run already holds from earlier attempts (see
    `logged_steps`); `log_epoch` skips them, so a resumed attempt never logs an epoch twice.
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
        job_type: str | None = None,
        tags: Sequence[str] = (),
        export: str | None = None,
    ) -> WandbRun:
        """`system_metrics`: W&B's CPU/GPU sampling (on for GPU runs, where utilisation and
        memory are worth watching; off on CPU, where it only takes time from training).
        `job_type`: train, evaluate, export or sweep: W&B's filter within a group.
        `export`: where offline runs of this id are kept (their steps count as logged)."""
        if config.mode == "disabled":
            return cls(None)
        mode = config.mode
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
            print("W&B: online mode asked for but no WANDB_API_KEY or ~/.netrc entry: offline")
            mode = "offline"
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        _forget_service_address()
        run = wandb.init(
            project=config.project,
            entity=config.entity,
            id=run_id,
            name=name,
            group=group,
            job_type=job_type,
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
        _forget_service_address()
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

    def log_epoch(
        self,
        row: dict[str, Any],
        step: int,
        images: dict[str, list[tuple[Any, str]]] | None = None,
    ) -> None:
        """A history row of train_history.csv, under W&B's names (`train/`, `val/`); never
        twice for one step (`logged_steps`), so a resumed attempt can log what W&B lacks."""
        if step in self.logged_steps:
            return
        self.logged_steps.add(step)
        self.log(wandb_keys(row), step=step, images=images)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run:
            self.run.summary.update(values)

    def summarise_best(self, best_row: dict[str, Any]) -> None:
        """The best epoch's numbers as the summary: W&B would otherwise show the last epoch's
        `val/*`, not those of the weights kept in model.pt. Also under `best/`, with the epoch."""
        named = wandb_keys(best_row)
        best = {f"best/{k}": v for k, v in named.items() if k.startswith("val/")}
        self.summary({**named, **best, "best/epoch": best_row["epoch"]})

    def log_model(
        self, path: Path, name: str, metadata: dict, aliases: list[str] | None = None
    ) -> None:
        """A version of the model artifact `name` holding the file at `path` (as named)."""
        if self.run:
            import wandb

            artifact = wandb.Artifact(name, type="model", metadata=redact(metadata))
            artifact.add_file(str(path))
            self.run.log_artifact(artifact, aliases=aliases or [])

    def use_data(self, pipeline: str, location: str, version: str) -> None:
        """Record the shards as the run's input: a dataset artifact by reference (where the
        shards are and their DVC hash, not their bytes), so W&B draws data -> run -> model.

        `run.use_artifact` refuses offline runs; a draft artifact logged with
        `use_after_commit` is what `use_artifact` itself sends for one (online), and what
        `wandb sync` turns into an input of the run. The same goes into the config, readable
        without a server.
        """
        if not self.run:
            return
        artifact = data_artifact(pipeline, location, version)
        if self.run.offline:
            self.run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
        else:
            self.run.use_artifact(artifact)
        self.run.config.update(
            {"data_artifact": {"name": artifact.name, "location": location, "version": version}},
            allow_val_change=True,
        )

    def log_evaluation(self, scored: EvaluationLog) -> None:
        """Test metrics as the summary; the confusion matrix, tables, images and the report
        page in one history row; the page also as a `report` artifact."""
        if not self.run:
            return
        import wandb

        self.summary({f"test/{k}": v for k, v in scored.metrics.items() if _is_number(v)})
        row: dict[str, Any] = {
            "test/confusion_matrix": wandb.plot.confusion_matrix(
                y_true=scored.labels, preds=scored.predicted, class_names=scored.class_names
            ),
            "test/per_class": _table(scored.per_class),
            "test/most_confident_mistakes": _table(scored.mistakes),
            "test/report": wandb.Html(scored.report.read_text(encoding="utf-8")),
        }
        for key, (path, caption) in scored.figures.items():
            row[f"test/figures/{key}"] = wandb.Image(str(path), caption=caption)
        self.log(row, step=0, images={"test/mistake_images": scored.mistake_images})
        report = wandb.Artifact(f"report-{scored.pipeline}", type="report")
        report.add_file(str(scored.report), name="index.html")
        self.run.log_artifact(report, aliases=scored.aliases)

    def log_table(self, key: str, rows: list[dict[str, Any]]) -> None:
        if self.run:
            self.run.log({key: _table(rows)}, commit=True)

    def tag(self, *tags: str) -> None:
        if self.run:
            self.run.tags = tuple(dict.fromkeys([*self.run.tags, *tags]))

    def finish(self, preempted: bool = False) -> None:
        """End the run; `preempted`: stopped on request, to be resumed (W&B shows it so)."""
        if self.run:
            if preempted:
                self.run.mark_preempting()
            self.run.finish(exit_code=130 if preempted else 0)
            self.run = None


@dataclass(frozen=True)
class EvaluationLog:
    """What `evaluate` shares on W&B, as plain values (tracking knows nothing of evaluate)."""

    pipeline: str
    metrics: dict[str, Any]
    class_names: list[str]
    labels: list[int]  # true class of every test sample
    predicted: list[int]  # the model's decision for each
    per_class: list[dict[str, Any]]
    mistakes: list[dict[str, Any]]  # the most confident mistakes, surest first
    report: Path  # the self-contained report page
    figures: dict[str, tuple[Path, str]] = field(default_factory=dict)  # key -> (PNG, caption)
    mistake_images: list[tuple[Any, str]] = field(default_factory=list)  # (pixels, caption)
    aliases: list[str] = field(default_factory=list)


def wandb_keys(row: dict[str, Any]) -> dict[str, Any]:
    """train_history.csv's columns under W&B names: `train_loss` -> `train/loss`,
    `val_accuracy` -> `val/accuracy`, the other training numbers (lr, speed) under `train/`;
    `epoch` stays as it is."""
    named = {}
    for key, value in row.items():
        prefix, _, rest = key.partition("_")
        if key == "epoch":
            named[key] = value
        elif prefix in ("train", "val", "test") and rest:
            named[f"{prefix}/{rest}"] = value
        else:
            named[f"train/{key}"] = value
    return named


def experiment_name() -> str | None:
    """The DVC experiment this process runs in (`dvc exp run` sets DVC_EXP_NAME), if any."""
    return experiment_identity().name


def artifact_aliases(
    first: str | None, git_commit: str | None, experiment: str | None
) -> list[str]:
    """Aliases of an artifact version: its role (e.g. best), the commit, the experiment.
    W&B refuses '/' and ':' in aliases."""
    chosen = [first, git_commit, experiment]
    cleaned = [str(a).replace("/", "-").replace(":", "-") for a in chosen if a]
    return list(dict.fromkeys(cleaned))


def data_artifact(pipeline: str, location: str, version: str) -> Any:
    """The shards as a W&B dataset artifact: a reference to their location (nothing
    uploaded) and a few bytes naming their version, so a new DVC hash is a new version."""
    import wandb

    artifact = wandb.Artifact(
        f"data-{pipeline}",
        type="dataset",
        metadata={"location": location, "data_version": version},
    )
    uri = location if "://" in location else Path(location).resolve().as_uri()
    artifact.add_reference(uri, name="shards", checksum=False)
    with artifact.new_file("data_version.json") as handle:
        json.dump({"location": location, "data_version": version}, handle)
    return artifact


def follow_up_run(
    config: WandbConfig,
    directory: Path,
    payload: dict[str, Any],
    job_type: str,
    run_config: dict[str, Any],
) -> WandbRun:
    """A run that scores or converts a trained model: in the W&B group of the training run
    that made `payload` (model.pt's values), with its own id, so it never rewrites the
    training run's history (offline runs cannot resume one another before `wandb sync`)."""
    training = payload.get("wandb_run_id") or payload.get("run_name") or "model"
    group = payload.get("wandb_group") or training
    experiment = experiment_identity()  # which `dvc exp run` asked for it, if one did
    name = f"{training}-{job_type}"
    return WandbRun.start(
        config,
        run_id=f"{training}-{job_type}-{uuid.uuid4().hex[:6]}",
        name=f"{experiment.name} ({name})" if experiment.name else name,
        directory=directory,
        run_config={
            **run_config,
            "trained_by": training,
            "dvc_experiment": experiment.as_config(),
        },
        group=group,
        job_type=job_type,
        tags=experiment.tags,
    )


def run_reference(run: WandbRun, config: WandbConfig, workspace: Path) -> dict[str, Any] | None:
    """Where a (driver-side) run is, for a DVC metrics file: its id, its path
    (entity/project/id) and its local folder relative to `workspace`. Call before finishing."""
    if run.run is None:
        return None
    project = "/".join(part for part in (config.entity, config.project) if part)
    folder = run.directory
    if folder is not None and folder.resolve().is_relative_to(workspace.resolve()):
        folder = folder.resolve().relative_to(workspace.resolve())
    return {
        "run_id": run.run.id,
        "run_path": f"{project}/{run.run.id}",
        "folder": str(folder) if folder else None,
    }


def close_runs(
    config: WandbConfig, directory: Path, group: str, runs: dict[str, dict[str, Any]]
) -> None:
    """Reopen runs of `group` (`run id -> {"tags": [...], "summary": {...}}`) to tag them
    and give them a summary, then finish each with exit code 0. For sweeps: Tune kills a
    trial's workers when it ends (so W&B would call it crashed), and which trial is best is
    known only once every trial ended."""
    for run_id, change in runs.items():
        run = WandbRun.start(
            config,
            run_id=run_id,
            name=run_id,
            directory=directory,
            run_config={},
            group=group,
            job_type="train",
        )
        run.tag(*change.get("tags", []))
        run.summary(change.get("summary", {}))
        run.finish()


def _table(rows: list[dict[str, Any]]) -> Any:
    import wandb

    columns = list(rows[0]) if rows else ["empty"]
    return wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def finish_and_say(run: WandbRun) -> None:
    """Finish a driver-side run and say where an offline one is (and how to share it)."""
    directory = run.directory
    offline = run.run is not None and run.run.offline
    run.finish()
    if offline and directory is not None:
        print(f"W&B offline run: {directory}  (share it: wandb sync {directory})")


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
