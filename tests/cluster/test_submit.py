"""`attnpipe submit` and `attnpipe jobs` against a real Ray head started here (loopback only).

The head runs without the test's AWS_* variables: the job reaches the S3 bucket (moto on
127.0.0.1) only through the variables `submit` passes in its runtime environment. The shards
exist on S3 only as far as the job is concerned (data/ is never uploaded), and checkpoints go
there too, as do the outputs each job publishes for `submit` and `pull` to bring home.

Jobs are the slow part: one head, one bucket and one trained run serve the whole module (the
evaluate job scores that run), each other behaviour rides on as few jobs as it can, and the
sweep submitted without waiting runs beside the evaluate job's instead of after the others.

The head is stopped by killing the processes it started (found by its private temp dir), never
with `ray stop`, which would kill every Ray process on this shared machine.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, redirect_stderr, redirect_stdout, suppress
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import pytest
import yaml

from attnpipe import jobs
from attnpipe.cli import main
from attnpipe.data.shard import publish_shards
from tests.conftest import REPO, S3Bucket, make_s3_bucket

# Real Ray / DVC runs: minutes on an idle 2-core machine; the allowance covers a busy one.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Head:
    address: str
    temp_dir: str


def _free_ports(count: int) -> list[int]:
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _kill_head(process: subprocess.Popen, temp_dir: str) -> None:
    """SIGKILL at once: nothing of the head outlives the temp dir removed after it, and
    `ray start --block` did not exit within the 10 s this used to wait after a SIGTERM (the
    module's teardown took 10 s every run)."""
    import psutil

    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    # Whatever this head started and is still alive names its private temp dir.
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                proc.kill()
        except psutil.Error:
            pass
    process.wait()


@pytest.fixture(scope="module")
def ray_head() -> Head:
    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: socket paths live here
    gcs, dashboard, *more = _free_ports(8)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "WANDB_", "RAY_ADDRESS", "RAY_AUTH", "ATTNPIPE_"))
    }
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}",  # the job's `attnpipe` and workers' python
        RAY_AUTH_MODE="disabled",  # loopback only; token auth is a cluster setting (README)
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
        # A busy 2-core machine can take longer than the defaults to start the node's agents.
        RAY_agent_register_timeout_ms="120000",
        RAY_raylet_start_wait_time_s="120",
    )
    command = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={more[0]}",
        f"--dashboard-agent-listen-port={more[1]}",
        f"--dashboard-agent-grpc-port={more[2]}",
        f"--runtime-env-agent-port={more[3]}",
        f"--metrics-export-port={more[4]}",
        f"--node-manager-port={more[5]}",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    head = Head(f"http://127.0.0.1:{dashboard}", temp_dir)
    try:
        _wait_until_jobs_are_accepted(head, process)
        yield head
    finally:
        _kill_head(process, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_until_jobs_are_accepted(head: Head, process: subprocess.Popen) -> None:
    """The dashboard answers before the node's job agent is up: run a no-op job through."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 240
    error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError((Path(head.temp_dir) / "ray-start.log").read_text()[-3000:])
        try:
            client = JobSubmissionClient(head.address)
            job = client.submit_job(entrypoint="true")
            while str(client.get_job_status(job)) not in jobs.TERMINAL:
                time.sleep(0.5)
            return
        except Exception as caught:
            error = caught
            time.sleep(0.5)
    raise TimeoutError(f"the Ray head at {head.address} did not run a job: {error}")


@pytest.fixture(scope="module")
def cluster_project(digits_project, tmp_path_factory) -> Path:
    """The digits project as a user would submit it: shards and checkpoints on S3."""
    _, built = digits_project
    root = tmp_path_factory.mktemp("submit") / "project"
    shutil.copytree(built.root, root)  # with src/ (the code the job must run) and uv.lock
    shutil.copy(REPO / "pyproject.toml", root)
    return root


@pytest.fixture(scope="module")
def cluster_env(ray_head, moto_endpoint: str, cluster_project: Path) -> Iterator[S3Bucket]:
    """One bucket for the module: the shards, the checkpoints and the published outputs."""
    with pytest.MonkeyPatch.context() as patch:
        bucket = make_s3_bucket(moto_endpoint, patch)
        patch.setenv("RAY_AUTH_MODE", "disabled")
        patch.delenv("RAY_ADDRESS", raising=False)
        patch.delenv("ATTNPIPE_TRACE_DIR", raising=False)
        shards = bucket.url("digits", "shards")
        publish_shards(cluster_project / "data/digits/shards", shards)
        recipe_file = cluster_project / "pipelines/digits.yaml"
        recipe = yaml.safe_load(recipe_file.read_text())
        recipe["shard"]["publish_to"] = shards
        recipe["train"].update(epochs=1, storage_path=bucket.url("ckpt"))
        recipe["tracking"] = {"wandb": {"mode": "disabled"}}
        recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
        yield bucket


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@dataclass(frozen=True)
class Trained:
    code: int
    output: str  # what `attnpipe submit` printed
    model: bytes  # the model.pt it brought home


@pytest.fixture(scope="module")
def trained(ray_head, cluster_env: S3Bucket, cluster_project: Path) -> Trained:
    """`attnpipe submit digits` (train), once: its run is the one the evaluate job scores."""
    printed = StringIO()
    with redirect_stdout(printed), redirect_stderr(printed):
        code = main(["--root", str(cluster_project), "submit", "digits", *_at(ray_head)])
    model = cluster_project / "models/digits/model.pt"
    return Trained(code, printed.getvalue(), model.read_bytes() if model.is_file() else b"")


@dataclass(frozen=True)
class Submitted:
    code: int
    output: str  # what `attnpipe submit` printed


@pytest.fixture(scope="module")
def tune_submitted(ray_head, cluster_env, cluster_project: Path, tmp_path_factory) -> Submitted:
    """`attnpipe submit digits --stage tune --no-wait`, once. The evaluate test asks for it
    too, so that the sweep runs while that test's job and the next tests' run (the head has
    CPUs for both, and a job not followed is what --no-wait is for): the tune test then waits
    only for what is left of it, instead of for a whole sweep started last."""
    # The sweep comes from an overrides file outside the project (never uploaded: inlined as
    # --set) and --set: the digits recipe has no tune.space, so only the changes make it run.
    overrides = tmp_path_factory.mktemp("sweep") / "sweep.yaml"
    sweep = {
        "tune.space": {"train.optimizer.lr": {"type": "grid", "values": [0.003]}},
        "tune.num_samples": 1,
        "tune.workers_per_trial": 1,
        "tune.cpus_per_worker": 0.5,
    }
    overrides.write_text(yaml.safe_dump(sweep))
    argv = ["--root", str(cluster_project), "submit", "digits", "--stage", "tune", "--no-wait"]
    argv += ["--overrides", str(overrides), "--set", "tune.epochs=1", *_at(ray_head)]
    printed = StringIO()
    with redirect_stdout(printed), redirect_stderr(printed):
        code = main(argv)
    return Submitted(code, printed.getvalue())


def _at(head: Head) -> list[str]:
    return ["--address", head.address]


def _bucket_keys(bucket: S3Bucket, prefix: str) -> set[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=bucket.endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket.name, Prefix=prefix)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def test_submit_trains_on_the_cluster_and_brings_the_model_home(
    ray_head, cluster_env, cluster_project, trained, capsys
):
    code, output = trained.code, trained.output
    assert code == 0, output[-4000:]
    assert re.search(r"uploading .* \(\d+ files", output)
    assert "AWS_SECRET_ACCESS_KEY" in output  # named ...
    assert cluster_env.env["AWS_SECRET_ACCESS_KEY"] not in output  # ... never shown
    assert "epoch 1/1" in output  # the job's logs, streamed
    results = jobs.parse_results(output)
    assert results["stage"] == "train" and results["epochs_run"] == 1
    assert 0 <= results["metrics"]["val_accuracy"] <= 1
    summary = output.strip().splitlines()[-1]
    assert "SUCCEEDED (exit 0)" in summary and "val_accuracy" in summary
    job_id = re.search(r"submitted job (\S+):", output).group(1)

    # The checkpoints went to S3 (the job had no other shared storage), with the run's model
    # file beside its best weights, and the job's outputs under its own folder.
    run = results["run_name"]
    keys = _bucket_keys(cluster_env, "ckpt/")
    assert any(key.startswith(f"ckpt/{run}/checkpoint_") for key in keys)
    assert f"ckpt/{run}/best/model.pt" in keys
    assert f"ckpt/digits/outputs/train/{job_id}/manifest.json" in keys
    assert results["outputs"] == cluster_env.url("ckpt", "digits", "outputs", "train", job_id)

    # ... and home, where a local run writes them, with the job's content.
    from attnpipe.modelfile import read_payload

    assert "brought home from" in output
    reports = cluster_project / "reports/digits"
    payload = read_payload(cluster_project / "models/digits/model.pt")
    assert (payload["run_name"], payload["epoch"]) == (run, results["best_epoch"])
    assert json.loads((reports / "train.json").read_text())["run_name"] == run
    with (reports / "train_history.csv").open() as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1"]

    code, listing = _cli(capsys, "jobs", "list", "--address", ray_head.address)
    assert code == 0 and re.search(rf"{job_id}\s+SUCCEEDED\s+train\s+digits", listing), listing
    code, logs = _cli(capsys, "jobs", "logs", job_id, "--address", ray_head.address)
    assert code == 0 and "epoch 1/1" in logs
    assert cluster_env.env["AWS_SECRET_ACCESS_KEY"] not in listing + logs


def test_evaluate_scores_the_stored_run_and_brings_its_report_home(
    ray_head, cluster_env, cluster_project, trained, tune_submitted, capsys
):
    # tune_submitted: the sweep is started here, to run beside this job (see the fixture).
    run = jobs.parse_results(trained.output)["run_name"]
    model = cluster_project / "models/digits/model.pt"
    figures = cluster_project / "reports/digits/figures"
    figures.mkdir(parents=True, exist_ok=True)
    (figures / "stale.png").write_bytes(b"a figure the new report does not have")
    # Uploaded with the project (no .gitignore here), and not a model: the job must score the
    # run from storage, never this file.
    model.write_bytes(b"not a model")
    try:
        argv = ["--root", str(cluster_project), "submit", "digits", "--stage", "evaluate"]
        code, output = _cli(capsys, *argv, *_at(ray_head))
    finally:
        model.write_bytes(trained.model)
    assert code == 0, output[-4000:]
    assert f"evaluating training run '{run}'" in output
    results = jobs.parse_results(output)
    assert results["stage"] == "evaluate"

    reports = cluster_project / "reports/digits"
    metrics = json.loads((reports / "metrics.json").read_text())["test"]
    assert metrics["test_samples"] == results["metrics"]["test_samples"]
    assert metrics["accuracy"] == pytest.approx(results["metrics"]["accuracy"])
    with (reports / "confusion.csv").open() as handle:
        assert sum(1 for _ in csv.DictReader(handle)) == metrics["test_samples"]
    assert (reports / "per_class.csv").is_file() and (reports / "test_summary.json").is_file()
    assert "<html" in (reports / "index.html").read_text().lower()
    shown = {p.name for p in figures.iterdir()}
    assert "confusion.png" in shown and "training_curves.png" in shown  # the run's history
    assert "stale.png" not in shown  # the folder is the job's, whole


def test_a_failing_job_returns_non_zero_and_brings_nothing_home(
    ray_head, cluster_env, cluster_project, capsys
):
    # A recipe whose run was never trained: evaluate in the job finds no model on storage.
    before = _files(cluster_project)
    argv = ["--root", str(cluster_project), "submit", "digits", "--stage", "evaluate"]
    code, output = _cli(capsys, *argv, "--set", "train.epochs=2", *_at(ray_head))
    assert code != 0
    assert "has no model at" in output and "--stage train" in output
    assert "FAILED" in output.strip().splitlines()[-1]
    assert "brought home" not in output
    assert _files(cluster_project) == before  # not one file written or touched here


def test_tune_submitted_without_waiting_comes_home_with_pull(
    ray_head, cluster_env, cluster_project, tune_submitted, capsys
):
    code, output = tune_submitted.code, tune_submitted.output
    assert code == 0, output
    job_id = re.search(r"submitted job (\S+):", output).group(1)
    assert f"attnpipe pull digits --job {job_id}" in output
    result = jobs.outcome(jobs.connect(ray_head.address), job_id, timeout=900)
    assert result.status == "SUCCEEDED", result.logs[-4000:]
    assert jobs.parse_results(result.logs)["best_params"] == {"train.optimizer.lr": 0.003}
    trials_file = cluster_project / "reports/digits/tune_trials.csv"
    assert not trials_file.exists()  # nothing comes home unasked

    code, output = _cli(capsys, "--root", str(cluster_project), "pull", "digits", "--job", job_id)
    assert code == 0, output
    assert f"tune outputs of job {job_id}" in output
    with trials_file.open() as handle:
        (trial,) = csv.DictReader(handle)
    assert float(trial["train.optimizer.lr"]) == 0.003
    best = yaml.safe_load((cluster_project / "reports/digits/best_params.yaml").read_text())
    assert best == {"train.optimizer.lr": 0.003}


def test_unknown_pipeline_or_missing_object_storage_fails_before_uploading(
    ray_head, cluster_env, cluster_project, capsys, tmp_path
):
    argv = ["--root", str(cluster_project), "submit", "nope", "--address", ray_head.address]
    code, output = _cli(capsys, *argv)
    assert code == 1 and "unknown pipeline 'nope'" in output and "uploading" not in output

    bare = tmp_path / "bare"
    (bare / "pipelines").mkdir(parents=True)
    recipe = yaml.safe_load((cluster_project / "pipelines/digits.yaml").read_text())
    del recipe["shard"]["publish_to"], recipe["train"]["storage_path"]
    (bare / "pipelines/digits.yaml").write_text(yaml.safe_dump(recipe))
    code, output = _cli(capsys, "--root", str(bare), "submit", "digits", "--address", "http://x")
    assert code == 1 and "shard.publish_to" in output and "train.storage_path" in output


def test_the_job_runs_the_submitted_code_and_can_be_stopped(
    ray_head, cluster_env, cluster_project, capsys
):
    probe = "python -c \"import attnpipe; print('attnpipe from', attnpipe.__file__)\""
    out = StringIO()
    result = jobs.submit(cluster_project, "digits", ray_head.address, entrypoint=probe, out=out)
    assert result.status == "SUCCEEDED", out.getvalue()[-3000:]
    origin = re.search(r"attnpipe from (\S+)", result.logs).group(1)
    # The uploaded copy (under this head's runtime resources), not the installed one.
    assert origin.startswith(ray_head.temp_dir) and "runtime_resources" in origin
    assert origin.endswith("/src/attnpipe/__init__.py")

    sleeper = jobs.submit(
        cluster_project, "digits", ray_head.address, entrypoint="sleep 300", wait=False, out=out
    )
    code, output = _cli(capsys, "jobs", "stop", sleeper.job_id, "--address", ray_head.address)
    assert code == 0 and "STOPPED" in output
