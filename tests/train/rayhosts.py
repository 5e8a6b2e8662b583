"""Two Ray hosts on one machine, each its own network namespace (tests/netns.py): a head on
host A and a node on host B, joined with `ray start` over a veth link with token
authentication, as real machines would be. Used by the multi-host training tests.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns import Host, NetnsUnavailable, Network, create_hosts, tcp_reachable
from tests.train.trace import events

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


# The head's GCS declares a silent node dead in about 2 s, not Ray's default 15: what the tests
# that kill a host check is the run's behaviour after the loss, not Ray's detection delay.
QUICK_NODE_DEATH = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_failure_threshold": "2",
    "RAY_health_check_timeout_ms": "1000",
}


@contextmanager
def running_ray_hosts(tmp_path: Path, **env: str) -> Iterator[RayHosts]:
    """Two hosts with a running Ray cluster (`env` added to every node's and the driver's
    environment); afterwards nothing of them is left."""
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
            **env,
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
