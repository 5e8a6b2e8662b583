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
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.netns import Host, NetnsUnavailable, Network, create_hosts, tcp_reachable
from tests.train.trace import events, recorded_epoch

# Real Ray / DVC runs: minutes on an idle 2-core machine; the allowance covers a busy one.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

EPOCHS = 4
RAY_PORT = 6379
VENV_BIN = Path(sys.executable).parent


@dataclass
class RayHosts:
    """A Ray cluster on two namespace hosts: head on `head`, one node on `node`."""

    network: Network
    head: Host
    node: Host
    env: dict[str, str]  # every node's and the driver's environment
    logs: Path

    @property
    def address(self) -> str:
        return f"{self.head.address}:{RAY_PORT}"

    def ray_start(self, host: Host, *args: str) -> None:
        """`ray start` on `host` (it returns once the node's daemons run); fails with its log."""
        log = self.logs / f"ray-start-{host.namespace}-{time.monotonic_ns()}.log"
        with log.open("w") as out:
            done = subprocess.run(
                host.command(
                    str(VENV_BIN / "ray"),
                    "start",
                    f"--node-ip-address={host.address}",
                    "--num-cpus=1",
                    "--num-gpus=0",  # CPU ranks only, on a machine with a GPU too
                    # Far below the default (30% of RAM each): the machine is shared.
                    "--object-store-memory=200000000",
                    "--disable-usage-stats",
                    *args,
                ),
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=180,
            )
        assert done.returncode == 0, f"ray start on {host.namespace} failed:\n{tail(log)}"

    def nodes(self) -> list[dict]:
        """Every node the cluster has known (dead ones too): address, id, alive."""
        script = (
            "import json, sys, ray\n"
            "ray.init(address=sys.argv[1], log_to_driver=False)\n"
            "print(json.dumps([{'ip': n['NodeManagerAddress'], 'id': n['NodeID'], "
            "'alive': n['Alive']} for n in ray.nodes()]))\n"
        )
        done = subprocess.run(
            self.head.command(sys.executable, "-c", script, self.address),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])


def tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return f"({path} was not written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def ray_hosts(tmp_path: Path) -> Iterator[RayHosts]:
    """Two hosts with a running Ray cluster; afterwards nothing of them is left."""
    try:
        network = create_hosts(2)
    except NetnsUnavailable as missing:
        pytest.fail(f"cannot make the test hosts: {missing}")
    # Ray's unix sockets live under its temp dir: keep that path short (108 bytes at most).
    temp_dir = Path(tempfile.mkdtemp(prefix="aph-"))
    try:
        token = tmp_path / "ray_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        head, node = network.hosts
        env = {
            **os.environ,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            # Gloo would otherwise bind to the hostname's address, which no namespace has.
            "GLOO_SOCKET_IFNAME": head.interface,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            "ATTNPIPE_TRACE_DIR": str(tmp_path / "trace"),
            "WANDB_MODE": "disabled",
        }
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
            env.pop(name, None)
        hosts = RayHosts(network, head, node, env, tmp_path / "logs")
        hosts.logs.mkdir()
        # No ping here: a refused TCP connect proves that the link carries packets.
        assert tcp_reachable(node, head.address, RAY_PORT), f"{node} cannot reach {head}"
        hosts.ray_start(
            head,
            "--head",
            f"--port={RAY_PORT}",
            "--include-dashboard=false",
            f"--temp-dir={temp_dir}",
        )
        hosts.ray_start(node, f"--address={hosts.address}")
        yield hosts
    finally:
        network.close()  # SIGKILLs every process of both hosts, then deletes them
        shutil.rmtree(temp_dir, ignore_errors=True)


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


def attempts(trace: Path, rank: int) -> list[list[dict]]:
    """A rank's trace events, split at each (re)start of its worker."""
    split: list[list[dict]] = []
    for event in events(trace, rank):
        if event["event"] == "start":
            split.append([])
        if split:
            split[-1].append(event)
    return split


def wait_until(condition, what: str, driver: subprocess.Popen, log: Path, timeout: float):
    """Poll `condition` (returning a truthy value); fail with the driver's log on timeout/exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if driver.poll() is not None:
            pytest.fail(f"train exited ({driver.returncode}) before {what}:\n{tail(log)}")
        time.sleep(0.2)
    pytest.fail(f"no {what} within {timeout:.0f}s:\n{tail(log)}")


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
