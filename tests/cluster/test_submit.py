"""`attnpipe submit` and `attnpipe jobs` against a real Ray head started here (loopback only).

The head runs without the test's AWS_* variables: the job reaches the S3 bucket (moto on
127.0.0.1) only through the variables `submit` passes in its runtime environment. The shards
exist on S3 only as far as the job is concerned (data/ is never uploaded), and checkpoints go
there too.

The head is stopped by killing the processes it started (found by its private temp dir), never
with `ray stop`, which would kill every Ray process on this shared machine.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import pytest
import yaml

from attnpipe import jobs
from attnpipe.cli import main
from attnpipe.data.shard import publish_shards
from tests.conftest import REPO, S3Bucket

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
    import psutil

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    # Whatever this head started and is still alive names its private temp dir.
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                proc.kill()
        except psutil.Error:
            pass


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
            time.sleep(2)
    raise TimeoutError(f"the Ray head at {head.address} did not run a job: {error}")


@pytest.fixture(scope="module")
def cluster_project(digits_project, tmp_path_factory) -> Path:
    """The digits project as a user would submit it: shards and checkpoints on S3."""
    _, built = digits_project
    root = tmp_path_factory.mktemp("submit") / "project"
    shutil.copytree(built.root, root)  # with src/ (the code the job must run) and uv.lock
    shutil.copy(REPO / "pyproject.toml", root)
    return root


@pytest.fixture
def cluster_env(ray_head, s3_bucket: S3Bucket, cluster_project: Path, monkeypatch) -> S3Bucket:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("ATTNPIPE_TRACE_DIR", raising=False)
    shards = s3_bucket.url("digits", "shards")
    publish_shards(cluster_project / "data/digits/shards", shards)
    recipe_file = cluster_project / "pipelines/digits.yaml"
    recipe = yaml.safe_load(recipe_file.read_text())
    recipe["shard"]["publish_to"] = shards
    recipe["train"].update(epochs=1, storage_path=s3_bucket.url("ckpt"))
    recipe["tracking"] = {"wandb": {"mode": "disabled"}}
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return s3_bucket


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_submit_trains_on_the_cluster_and_returns_status_and_metrics(
    ray_head, cluster_env, cluster_project, capsys
):
    root = str(cluster_project)
    code, output = _cli(capsys, "--root", root, "submit", "digits", "--address", ray_head.address)

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

    # The checkpoints went to S3 (the job had no other shared storage).
    import boto3

    keys = boto3.client("s3", endpoint_url=cluster_env.endpoint).list_objects_v2(
        Bucket=cluster_env.name, Prefix=f"ckpt/{results['run_name']}/"
    )
    assert any("/checkpoint_" in item["Key"] for item in keys.get("Contents", []))

    code, listing = _cli(capsys, "jobs", "list", "--address", ray_head.address)
    assert code == 0 and re.search(rf"{job_id}\s+SUCCEEDED\s+train\s+digits", listing), listing
    code, logs = _cli(capsys, "jobs", "logs", job_id, "--address", ray_head.address)
    assert code == 0 and "epoch 1/1" in logs
    assert cluster_env.env["AWS_SECRET_ACCESS_KEY"] not in listing + logs


def test_a_failing_job_returns_non_zero(ray_head, cluster_env, cluster_project, capsys):
    # evaluate needs models/digits/model.pt in the working directory: there is none.
    assert not (cluster_project / "models/digits/model.pt").exists()
    code, output = _cli(
        capsys,
        "--root",
        str(cluster_project),
        "submit",
        "digits",
        "--stage",
        "evaluate",
        "--address",
        ray_head.address,
    )
    assert code != 0
    assert "model.pt is missing" in output
    assert "FAILED" in output.strip().splitlines()[-1]


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
