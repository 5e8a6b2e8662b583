"""Two hosts, each its own network namespace and address; one loses every process mid-run.

A Ray head on host A and a node on host B (`ray start`, as on real machines), joined over a
veth link with token authentication; `attnpipe train digits --address A:6379` runs on host A
with one DDP rank per host (gloo over the shared interface name, GLOO_SOCKET_IFNAME). In
epoch 2, host B dies whole (SIGKILL to every process in its namespace); a fresh `ray start`
there replaces it, Ray Train restarts the worker group from the epoch-1 checkpoint, and the
run finishes with every epoch exactly once.

The hosts share this machine's file system, so the local checkpoint folder is visible to both;
real nodes need shared storage for it (train.storage_path on S3/NFS, shard.publish_to for the
shards), which tests/cluster/test_s3_training.py covers.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.train.rayhosts import (
    QUICK_NODE_DEATH,
    RayHosts,
    attempts,
    running_ray_hosts,
    tail,
    wait_until,
)
from tests.train.trace import events, recorded_epoch

# Real Ray / DVC runs: minutes on an idle 2-core machine; the allowance covers a busy one.
pytestmark = [pytest.mark.ray, pytest.mark.netns, pytest.mark.timeout(1200)]

EPOCHS = 4


@pytest.fixture
def ray_hosts(tmp_path: Path) -> Iterator[RayHosts]:
    """The head notices the lost host in about 2 s (QUICK_NODE_DEATH), as in the elastic test."""
    with running_ray_hosts(tmp_path, **QUICK_NODE_DEATH) as hosts:
        yield hosts


def copy_project(digits_project, destination: Path) -> Path:
    """The session's tiny digits project: EPOCHS epochs, one CPU rank per host, no W&B."""
    _, built = digits_project
    shutil.copytree(built.root, destination)
    recipe_file = destination / "pipelines" / "digits.yaml"
    recipe = yaml.safe_load(recipe_file.read_text())
    recipe["train"].update(
        epochs=EPOCHS, workers=2, cpus_per_worker=1, use_gpu=False, max_failures=1
    )
    recipe["tracking"] = {"wandb": {"mode": "disabled"}}
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return destination


def test_a_host_lost_mid_run_is_replaced_and_the_run_resumes(digits_project, ray_hosts, tmp_path):
    hosts = ray_hosts
    project = copy_project(digits_project, tmp_path / "project")
    trace = Path(hosts.env["ATTNPIPE_TRACE_DIR"])
    checkpoints = project / "models" / "digits" / "checkpoints"
    log = hosts.logs / "train.log"
    command = [sys.executable, "-m", "attnpipe.cli", "--root", str(project)]
    with log.open("w") as out:
        driver = subprocess.Popen(
            hosts.head.command(*command, "train", "digits", "--address", hosts.address),
            env=hosts.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        victim = _kill_node_host_in_epoch_2(hosts, driver, trace, checkpoints, log)
        hosts.ray_start(hosts.node, f"--address={hosts.address}")  # a fresh node joins
        try:
            driver.wait(timeout=600)
        except subprocess.TimeoutExpired:
            pytest.fail(f"train did not finish within 600s of the new node:\n{tail(log)}")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
    output = tail(log, 60)
    assert driver.returncode == 0, output

    # The killed rank's worker and its partner restarted once, from a recorded checkpoint;
    # the epochs finished before the kill and after the restart are each epoch once.
    resumed = set()
    for rank in (0, 1):
        runs = attempts(trace, rank)
        assert len(runs) == 2, f"rank {rank} started {len(runs)} time(s):\n{output}"
        first, second = runs
        resume = second[0]["epoch"]
        resumed.add(resume)
        assert resume >= 1, output
        started_again = [e["epoch"] for e in second if e["event"] == "epoch"]
        assert started_again == list(range(resume + 1, EPOCHS + 1))
        finished = [e["epoch"] for run in runs for e in run if e["event"] == "checkpoint"]
        assert finished == list(range(1, EPOCHS + 1)), (rank, first, second)
    assert len(resumed) == 1
    assert victim["pid"] in [e["pid"] for e in attempts(trace, victim["rank"])[0]]

    # Every epoch exactly once in the history; the model is written.
    with (project / "reports" / "digits" / "train_history.csv").open() as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == list(range(1, EPOCHS + 1))
    assert (project / "models" / "digits" / "model.pt").is_file()

    # One rank per host in each attempt: first on A and the lost B, then on A and the new B.
    nodes = hosts.nodes()
    head_ids = {n["id"] for n in nodes if n["ip"] == hosts.head.address}
    dead_b = {n["id"] for n in nodes if n["ip"] == hosts.node.address and not n["alive"]}
    live_b = {n["id"] for n in nodes if n["ip"] == hosts.node.address and n["alive"]}
    assert len(head_ids) == len(dead_b) == len(live_b) == 1, nodes
    placed = [{attempts(trace, rank)[i][0]["node_id"] for rank in (0, 1)} for i in (0, 1)]
    assert placed == [head_ids | dead_b, head_ids | live_b], nodes


def _kill_node_host_in_epoch_2(
    hosts: RayHosts, driver: subprocess.Popen, trace: Path, checkpoints: Path, log: Path
) -> dict:
    """Once both ranks train epoch 2 and epoch 1 is recorded, SIGKILL all of host B.

    Returns the epoch-2 event of the rank that ran on B (with its rank and pid).
    """

    def epoch_2_everywhere() -> list[dict] | None:
        found = [
            next((e for e in events(trace, r) if e["event"] == "epoch" and e["epoch"] == 2), None)
            for r in (0, 1)
        ]
        return found if all(found) else None

    started = wait_until(epoch_2_everywhere, "epoch 2 on both ranks", driver, log, 600)
    wait_until(lambda: recorded_epoch(checkpoints) >= 1, "epoch-1 checkpoint", driver, log, 300)
    on_node = set(hosts.node.pids())
    victims = [{**event, "rank": rank} for rank, event in enumerate(started)]
    victims = [v for v in victims if v["pid"] in on_node]
    assert len(victims) == 1, f"expected one rank on {hosts.node.namespace}: {started}"
    killed = hosts.node.kill_all()
    assert victims[0]["pid"] in killed
    return victims[0]
