"""Connecting to Ray: a private local cluster, or a cluster's address checked first.

Shared by the data stages that run as Ray tasks (`prepare`/`shard --address`) and by training.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from attnpipe.errors import AttnpipeError

# Set to 0 to start a private local cluster without the Ray dashboard.
DASHBOARD_ENV = "ATTNPIPE_RAY_DASHBOARD"
# The CPUs a private local cluster offers (default: every core). Experiments run side by side
# (`dvc queue start -j 2`) each start one; give each its share: ATTNPIPE_RAY_CPUS=<cores / 2>.
CPUS_ENV = "ATTNPIPE_RAY_CPUS"
REACH_TIMEOUT_S = 5.0


class ClusterError(AttnpipeError, ConnectionError):
    """The cluster cannot be reached, or cannot run the work as configured; the message says
    what to change."""


def configure_ray_environment() -> None:
    """Settings Ray reads from the environment, defaulted before it is imported."""
    # Under `uv run`, Ray would otherwise package the working directory (data/ included) and
    # start every worker through `uv run`; the workers share this environment already.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # Ray's 60 s is too short for GPU nodes that autoscale in, or for a loaded machine.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")


def private_cluster_cpus(cpus_needed: int = 1) -> int:
    """The CPUs of a private local cluster: ATTNPIPE_RAY_CPUS when set, else every core (at
    least what the work needs, so that it can be placed)."""
    setting = os.environ.get(CPUS_ENV, "").strip()
    if not setting:
        return max(os.cpu_count() or 1, cpus_needed)
    if not setting.isdigit() or int(setting) < 1:
        raise ClusterError(f"{CPUS_ENV}={setting!r} is not a whole number of CPUs >= 1")
    if int(setting) < cpus_needed:
        raise ClusterError(
            f"{CPUS_ENV}={setting} but the work needs {cpus_needed} CPU(s): raise it, or lower "
            "train.workers / train.cpus_per_worker"
        )
    return int(setting)


def check_reachable(address: str) -> None:
    """A TCP connect to `host:port` (or a ray:// URL's), failing in seconds, not minutes."""
    if address in ("auto", "local"):
        return  # Ray resolves these itself (auto: a `ray start` on this machine)
    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(
            f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379 or ray://head:10001)"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} ({reason}): start it (`ray start --head`) "
            "or fix --address / RAY_ADDRESS"
        ) from None


def connect_ray(address: str | None, cpus_needed: int = 1) -> bool:
    """Join `address` (or RAY_ADDRESS), else start a private local cluster.

    Returns whether a connection was made here (and so must be shut down here).
    """
    import ray

    if ray.is_initialized():
        return False
    sigterm = signal.getsignal(signal.SIGTERM)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        ray.init(address=address, log_to_driver=True)
    else:
        # "local": a private cluster, never one that happens to run on this machine already
        # (`ray start`, a test's). Its one node is never drained, so Ray Train's preemption
        # watcher (an extra actor process per run) has nothing to watch.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        cpus = private_cluster_cpus(cpus_needed)
        print(f"starting a private Ray cluster on this machine with {cpus} CPU(s)", flush=True)
        ray.init(
            address="local",
            num_cpus=cpus,
            # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner
            # polls every second; without it each poll fails with a warning.
            include_dashboard=os.environ.get(DASHBOARD_ENV, "1") != "0",
            log_to_driver=True,
            configure_logging=False,
        )
    # Ray's core installs a fatal-signal handler that aborts on SIGTERM; put ours back so a
    # `kill` unwinds (shutting Ray down, keeping checkpoints) like Ctrl-C does.
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)
    return True


@contextmanager
def ray_connection(address: str) -> Iterator[None]:
    """Connected to `address` (unless this process already is); disconnected afterwards."""
    configure_ray_environment()
    import ray

    started_here = connect_ray(address)
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()
