"""Run a stage on a Ray cluster through Ray Job Submission, follow it, list and stop jobs.

`submit` ships the project folder (code, recipes, dvc.lock; never data/, checkpoints, caches
or .git) as the job's working directory, with its `src/` first on PYTHONPATH, ahead of whatever
attnpipe the cluster has installed, so the job runs exactly the code that was submitted. The
cluster provides the third-party packages (the launcher configs in cluster/ install them from
uv.lock). Data and checkpoints live on object storage: the recipe's `shard.publish_to` and
`train.storage_path`.

The stage publishes its outputs (model.pt, reports, W&B offline runs) to `train.storage_path`
and `submit` brings them home to where a local run writes them (`attnpipe.joboutputs`); for a
job not followed here, `attnpipe pull` does.

Credentials reach the job as environment variables of its runtime environment (AWS_*, WANDB_*
and any named with --env); their values are never printed, and any that look secret are
masked in the logs shown here.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from attnpipe import joboutputs, storage
from attnpipe.config import Recipe, apply_overrides, load_recipe
from attnpipe.errors import AttnpipeError
from attnpipe.paths import PipelinePaths
from attnpipe.tracking import SECRET_MARKERS

SUBMIT_STAGES = ("train", "tune", "evaluate")
# Never uploaded: data comes from object storage, checkpoints go there, the rest is local state.
# gitignore syntax: a leading "/" anchors at the project root ("data/" alone would also drop
# src/attnpipe/data/).
WORKING_DIR_EXCLUDES = (
    "/data/",
    "/models/*/checkpoints/",
    "/.venv/",
    "/wandb/",
    "/.dvc/cache/",
    "/.dvc/tmp/",
    ".git/",
    "__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
    "/dvc_plots/",
    "*.egg-info/",
    f"/{joboutputs.STAGING_PREFIX}*/",  # a download `pull` did not finish
)
UPLOAD_LIMIT_BYTES = 512 * 1024 * 1024  # Ray's cap on a working_dir package
PASSTHROUGH_PREFIXES = ("AWS_", "WANDB_")
# Paths and profile names of this machine mean nothing on the cluster's nodes.
LOCAL_ONLY = re.compile(r"(_FILE|_DIR|_PATH|_BUNDLE)$|^AWS_PROFILE$|^AWS_DEFAULT_PROFILE$")
# Set in the job's environment: the stage prints one line of JSON results for `submit` to read.
RESULT_ENV = "ATTNPIPE_RESULT_LINE"
RESULT_MARKER = "attnpipe-result: "
# The dashboard URL with which train, evaluate and tune submit themselves (`dvc repro` on a
# cluster); a job's environment never has it (see `passthrough_env`).
CLUSTER_ENV = "ATTNPIPE_CLUSTER"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
YAML_DOCUMENT_END = "\n...\n"  # what yaml.safe_dump puts after a lone scalar


class JobError(AttnpipeError, RuntimeError):
    """A job could not be submitted or followed; the message says what to do."""


@dataclass(frozen=True)
class UploadPlan:
    files: int
    bytes: int
    largest: list[tuple[str, int]]
    names: frozenset[str] = frozenset()


@dataclass
class JobOutcome:
    job_id: str
    status: str
    exit_code: int
    metrics: dict[str, Any] | None = None
    message: str = ""
    logs: str = field(default="", repr=False)
    brought_home: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- environment
def job_address(address: str | None) -> str:
    """The dashboard URL: --address, else RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS."""
    if address:
        return address
    if os.environ.get("RAY_API_SERVER_ADDRESS"):
        return os.environ["RAY_API_SERVER_ADDRESS"]
    if os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        return os.environ["RAY_ADDRESS"]
    raise JobError(
        "no cluster given: pass --address http://HEAD:8265 (the Ray dashboard; with "
        "`ray dashboard cluster/aws.yaml` running, http://127.0.0.1:8265) or set "
        "RAY_API_SERVER_ADDRESS"
    )


def passthrough_env(
    extra: Iterable[str] = (), environ: dict[str, str] | None = None
) -> dict[str, str]:
    """The variables the job needs from here: AWS_*, WANDB_* and the names in `extra`."""
    environ = dict(os.environ if environ is None else environ)
    chosen = {
        name: value
        for name, value in environ.items()
        if name.startswith(PASSTHROUGH_PREFIXES) and not LOCAL_ONLY.search(name)
    }
    for name in extra:
        if name not in environ:
            raise JobError(f"--env {name}: no such variable in this environment")
        chosen[name] = environ[name]
    return chosen


def secret_values(env: dict[str, str]) -> list[str]:
    """Values to mask wherever they could be shown: those of secret-looking names."""
    return sorted(
        (v for k, v in env.items() if any(m in k.upper() for m in SECRET_MARKERS) and len(v) >= 4),
        key=len,
        reverse=True,
    )


def mask(text: str, secrets: Iterable[str]) -> str:
    for value in secrets:
        text = text.replace(value, "***")
    return text


# --------------------------------------------------------------------------- working dir
def plan_upload(root: Path, excludes: Iterable[str] = WORKING_DIR_EXCLUDES) -> UploadPlan:
    """What Ray will package from `root`: its own traversal, with .gitignore/.rayignore."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = root.resolve()
    sizes: dict[str, int] = {}

    def visit(path: Path) -> None:
        if path.is_file():
            sizes[str(path.relative_to(root))] = path.stat().st_size

    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    _dir_travel(root, [_get_excludes(root, list(excludes))], visit, include_gitignore)
    largest = sorted(sizes.items(), key=lambda item: item[1], reverse=True)[:5]
    return UploadPlan(len(sizes), sum(sizes.values()), largest, frozenset(sizes))


def build_runtime_env(root: Path, env: dict[str, str]) -> dict[str, Any]:
    root = root.resolve()
    env_vars = {**env, "PYTHONUNBUFFERED": "1", RESULT_ENV: "1"}
    if (root / "src" / "attnpipe").is_dir():
        # The job's processes start in the unpacked working directory; Python makes this entry
        # absolute at startup, ahead of site-packages: the submitted attnpipe is imported, not
        # the copy installed on the cluster. (`py_modules` would apply the excludes inside the
        # package too, dropping attnpipe/data.)
        env_vars["PYTHONPATH"] = "src"
    return {
        "working_dir": str(root),
        "excludes": list(WORKING_DIR_EXCLUDES),
        "env_vars": env_vars,
    }


def cluster_recipe(root: Path, pipeline: str, changes: dict[str, Any] | None = None) -> Recipe:
    """The recipe the job runs: pipelines/<pipeline>.yaml with --overrides and --set."""
    recipe = load_recipe(pipeline, root)  # an unknown pipeline fails here, in a second
    if changes:
        recipe = apply_overrides(recipe, changes, origin=f"pipelines/{pipeline}.yaml + changes")
    return recipe


def stage_command(stage: str, pipeline: str, changes: dict[str, Any] | None = None) -> str:
    """`attnpipe <stage> <pipeline>` with every recipe change as a --set (an overrides file
    stays here: its values travel inline, in the order given, --set last, so --set wins)."""
    words = ["attnpipe", stage, pipeline]
    for key, value in (changes or {}).items():
        text = yaml.safe_dump(value, default_flow_style=True, width=2**31)
        words += ["--set", f"{key}={text.removesuffix(YAML_DOCUMENT_END).strip()}"]
    return shlex.join(words)


def check_recipe_for_cluster(
    root: Path, pipeline: str, stage: str, changes: dict[str, Any] | None = None
) -> list[str]:
    """Stop before uploading anything when the job could not find its data or keep results."""
    recipe = cluster_recipe(root, pipeline, changes)
    problems = []
    if not recipe.shard.publish_to:
        problems.append(
            f"shard.publish_to is not set in pipelines/{pipeline}.yaml: the job does not get "
            f"data/ (never uploaded), so publish the shards to object storage: set "
            f"shard.publish_to: s3://BUCKET/{pipeline}/shards and run `attnpipe shard {pipeline}`"
        )
    storage_path = recipe.train.storage_path
    shared = bool(storage_path) and (storage.is_url(storage_path) or storage_path.startswith("/"))
    if not shared:
        why = {
            "evaluate": "evaluate reads the training run's model from there, and the job "
            "publishes its report there for this machine to bring home",
        }.get(
            stage,
            "checkpoints and outputs would stay in the job's temporary folder on one node (and "
            "Ray Train needs storage every node sees; this machine brings the outputs home "
            "from there)",
        )
        problems.append(
            f"train.storage_path is not shared storage in pipelines/{pipeline}.yaml: {why}: "
            "set train.storage_path: s3://BUCKET/checkpoints (or a folder every node and this "
            "machine mount at the same path)"
        )
    return problems


# --------------------------------------------------------------------------- client
def connect(address: str | None):
    """A JobSubmissionClient for the dashboard at `address` (token auth from RAY_AUTH_*)."""
    from ray.job_submission import JobSubmissionClient

    url = job_address(address)
    try:
        return JobSubmissionClient(url)
    except Exception as error:
        hint = ""
        text = str(error)
        if "401" in text or "403" in text or "uthenticat" in text:
            hint = (
                " (the cluster uses token authentication: export RAY_AUTH_MODE=token and "
                "RAY_AUTH_TOKEN=<the token from `ray get-auth-token` on the head>)"
            )
        raise JobError(f"cannot reach the Ray job server at {url}: {text}{hint}") from None


def submit(
    root: Path,
    pipeline: str,
    address: str | None,
    stage: str = "train",
    wait: bool = True,
    extra_env: Iterable[str] = (),
    out: TextIO | None = None,
    entrypoint: str | None = None,
    changes: dict[str, Any] | None = None,
) -> JobOutcome:
    """Submit `attnpipe <stage> <pipeline>` (with `changes` as --set) as a Ray job; follow it
    unless `wait` is False, and when it succeeds bring its outputs home. With `entrypoint`,
    run that command instead (nothing is brought home)."""
    out = out or sys.stdout
    if stage not in SUBMIT_STAGES:
        raise JobError(f"unknown stage '{stage}'; choose one of: {', '.join(SUBMIT_STAGES)}")
    root = root.resolve()
    storage_path = None
    if entrypoint is None:
        problems = check_recipe_for_cluster(root, pipeline, stage, changes)
        if problems:
            raise JobError("; ".join(problems))
        entrypoint = stage_command(stage, pipeline, changes)
        storage_path = cluster_recipe(root, pipeline, changes).train.storage_path
    plan = plan_upload(root)
    if plan.bytes >= UPLOAD_LIMIT_BYTES:
        biggest = ", ".join(f"{name} ({size / 2**20:.0f} MiB)" for name, size in plan.largest)
        raise JobError(
            f"the working directory is {plan.bytes / 2**20:.0f} MiB, over Ray's 512 MiB limit; "
            f"largest files: {biggest}. Exclude them in .rayignore (or .gitignore), or move "
            "them to object storage"
        )
    env = passthrough_env(extra_env)
    secrets = secret_values(env)
    client = connect(address)
    job_id = f"attnpipe-{stage}-{pipeline}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    job_env = {**env, joboutputs.OUTPUTS_ENV: "1", joboutputs.JOB_ID_ENV: job_id}
    print(
        f"uploading {root} ({plan.files} files, {plan.bytes / 2**20:.1f} MiB; never "
        f"{', '.join(p.strip('/') for p in WORKING_DIR_EXCLUDES[:7])}...)",
        file=out,
    )
    if env:
        print(f"passing to the job: {', '.join(sorted(env))} (values not shown)", file=out)
    try:
        client.submit_job(
            entrypoint=entrypoint,
            submission_id=job_id,
            runtime_env=build_runtime_env(root, job_env),
            metadata={"attnpipe_pipeline": pipeline, "attnpipe_stage": stage},
        )
    except Exception as error:
        raise JobError(f"submitting the job failed: {mask(str(error), secrets)}") from None
    print(f"submitted job {job_id}: {entrypoint}", file=out)
    if not wait:
        print(
            f"follow it: attnpipe jobs logs {job_id} --follow --address {job_address(address)}",
            file=out,
        )
        if storage_path:
            print(
                f"once it succeeded, bring its outputs home: "
                f"attnpipe pull {pipeline} --job {job_id}",
                file=out,
            )
        return JobOutcome(job_id, "PENDING", 0, message="submitted")
    result = follow(client, job_id, out=out, secrets=secrets)
    if result.status == "SUCCEEDED" and storage_path:
        result.brought_home = bring_job_home(root, pipeline, stage, storage_path, job_id, out)
    return result


def bring_job_home(
    root: Path, pipeline: str, stage: str, storage_path: str, job_id: str, out: TextIO
) -> list[str]:
    """Copy the outputs a succeeded job published to where a local run writes them."""
    folder = joboutputs.job_folder(storage_path, pipeline, stage, job_id)
    published = joboutputs.find_published(storage_path, pipeline, stage, job_id)
    if published is None:
        raise JobError(
            f"job {job_id} succeeded but published no outputs at {folder} (no "
            f"{joboutputs.MANIFEST}): its logs say why (`attnpipe jobs logs {job_id}`)"
        )
    try:
        entries = joboutputs.bring_home(published, PipelinePaths(root, pipeline))
    except Exception as error:
        raise JobError(
            f"bringing job {job_id}'s outputs home from {folder} failed "
            f"({' '.join(str(error).split())}); a failed download replaces nothing here: "
            f"run `attnpipe pull {pipeline} --job {job_id}` to try again"
        ) from error
    print(f"brought home from {folder}: {', '.join(entries)}", file=out)
    return entries


def follow(
    client: Any, job_id: str, out: TextIO | None = None, secrets: Iterable[str] = ()
) -> JobOutcome:
    """Stream a job's logs until it ends; return its status, exit code and reported results."""
    out = out or sys.stdout
    secrets = list(secrets)
    try:
        for chunk in _tail(client, job_id):
            out.write(mask(chunk, secrets))
            out.flush()
    except KeyboardInterrupt:
        print(
            f"\nstopped following; job {job_id} keeps running. Follow it again with "
            f"`attnpipe jobs logs {job_id} --follow`, stop it with `attnpipe jobs stop {job_id}`",
            file=out,
        )
        return JobOutcome(job_id, "RUNNING", 130, message="no longer followed")
    return outcome(client, job_id, secrets)


def outcome(
    client: Any, job_id: str, secrets: Iterable[str] = (), timeout: float = 60
) -> JobOutcome:
    """Wait (briefly) for a terminal status and read the job's results line from its logs."""
    deadline = time.monotonic() + timeout
    info = client.get_job_info(job_id)
    while str(info.status) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    status = str(info.status)
    logs = mask(client.get_job_logs(job_id), secrets)
    if status == "SUCCEEDED":
        code = 0
    elif status == "FAILED":
        code = info.driver_exit_code or 1
    else:  # STOPPED, or still running after the timeout
        code = 1
    message = mask(info.message or "", secrets)
    return JobOutcome(job_id, status, code, parse_results(logs), message, logs)


def _tail(client: Any, job_id: str) -> Iterator[str]:
    """tail_job_logs is async; hand its chunks over as a plain iterator."""
    loop = asyncio.new_event_loop()
    stream = client.tail_job_logs(job_id).__aiter__()
    try:
        while True:
            try:
                yield loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()


def parse_results(logs: str) -> dict[str, Any] | None:
    """The last results line a stage printed (see RESULT_ENV), or None."""
    found = None
    for line in logs.splitlines():
        position = line.find(RESULT_MARKER)
        if position >= 0:
            try:
                found = json.loads(line[position + len(RESULT_MARKER) :])
            except json.JSONDecodeError:
                continue
    return found


def print_results(stage: str, results: dict[str, Any]) -> None:
    """Called by a stage when it runs as a job: one line that `submit` reads back."""
    if os.environ.get(RESULT_ENV):
        line = json.dumps({"stage": stage, **results}, sort_keys=True, default=str)
        print(RESULT_MARKER + line, flush=True)


# --------------------------------------------------------------------------- jobs
def list_jobs(address: str | None, every: bool = False) -> list[dict[str, Any]]:
    """attnpipe's jobs (every job with `every`), newest first; no runtime env, no secrets."""
    client = connect(address)
    rows = []
    for job in client.list_jobs():
        metadata = job.metadata or {}
        if not every and "attnpipe_pipeline" not in metadata:
            continue
        start = (job.start_time or 0) / 1000
        end = (job.end_time or 0) / 1000
        rows.append(
            {
                "id": job.submission_id or job.job_id,
                "status": str(job.status),
                "stage": metadata.get("attnpipe_stage", "-"),
                "pipeline": metadata.get("attnpipe_pipeline", "-"),
                "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start))
                if start
                else "-",
                "seconds": round((end or time.time()) - start) if start else 0,
                "entrypoint": job.entrypoint,
            }
        )
    return sorted(rows, key=lambda row: row["started"], reverse=True)


def format_jobs(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no jobs"
    columns = ("id", "status", "stage", "pipeline", "started", "seconds")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def job_logs(address: str | None, job_id: str, follow_logs: bool, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    client = connect(address)
    secrets = secret_values(passthrough_env())
    if not follow_logs:
        out.write(mask(client.get_job_logs(job_id), secrets))
        return 0
    result = follow(client, job_id, out=out, secrets=secrets)
    print(f"job {job_id} {result.status}", file=out)
    return result.exit_code


def stop_job(address: str | None, job_id: str, wait_seconds: float = 60) -> str:
    """Ask the job to stop (SIGTERM, then SIGKILL); return its final status."""
    client = connect(address)
    client.stop_job(job_id)
    return outcome(client, job_id, timeout=wait_seconds).status


def describe(result: JobOutcome, summarize: Callable[[dict[str, Any]], str] | None = None) -> str:
    text = f"job {result.job_id} {result.status} (exit {result.exit_code})"
    if result.metrics:
        text += "; " + (summarize(result.metrics) if summarize else json.dumps(result.metrics))
    elif result.status != "SUCCEEDED" and result.message:
        text += f": {result.message.strip().splitlines()[-1][:300]}"
    return text
