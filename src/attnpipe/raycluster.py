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
# Where Ray's State API clients look first for the dashboard (before RAY_ADDRESS, then a scan).
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
LOOPBACK = "127.0.0.1"
# How long a fixed-size run waits for its workers' placement (Ray's 60 s is too short for GPU
# nodes that autoscale in, or for a loaded machine); the GPU probe waits as long.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
FIXED_START_TIMEOUT_S = 600
DASHBOARD_PORT_TRIES = 3


class ClusterError(AttnpipeError, ConnectionError):
    """The cluster cannot be reached, or cannot run the work as configured; the message says
    what to change."""


def configure_ray_environment() -> None:
    """Settings Ray reads from the environment, defaulted before it is imported."""
    # Under `uv run`, Ray would otherwise package the working directory (data/ included) and
    # start every worker through `uv run`; the workers share this environment already.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault(START_TIMEOUT_ENV, str(FIXED_START_TIMEOUT_S))


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
        _start_private_cluster(private_cluster_cpus(cpus_needed))
    # Ray's core installs a fatal-signal handler that aborts on SIGTERM; put ours back so a
    # `kill` unwinds (shutting Ray down, keeping checkpoints) like Ctrl-C does.
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)
    return True


def _start_private_cluster(cpus: int) -> None:
    """`ray.init` of a new local cluster whose own processes know where its dashboard is.

    Ray's State API clients, Ray Train's placement-group cleaner among them (it asks every
    second whether the run's controller lives), find "the" cluster by scanning this machine's
    processes. Where other Ray clusters run too (a test's, `dvc queue start -j 2`), that scan
    fails ("Found multiple active Ray instances": a traceback in the log and a dead cleaner) or
    finds another cluster's dashboard (404s, or an answer that our controller is gone). So the
    dashboard gets a port chosen here, and the cluster's processes, which inherit this
    environment, are told it (RAY_API_SERVER_ADDRESS); this process's is left as it was.
    """
    import ray

    # Ray's own default for a new local cluster, chosen explicitly, which Ray otherwise says
    # in a warning on every start. Ray read its config at import: it re-reads it, as Ray does.
    if AUTH_MODE_ENV not in os.environ:
        from ray._raylet import Config

        os.environ[AUTH_MODE_ENV] = "token"
        Config.initialize("")
    # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner polls
    # every second; without it each poll fails with a warning.
    dashboard = os.environ.get(DASHBOARD_ENV, "1") != "0"
    for attempt in range(DASHBOARD_PORT_TRIES):
        port = _free_local_port()
        url = f"http://{LOOPBACK}:{port}"
        where = f", its dashboard at {url}" if dashboard else ""
        print(
            f"starting a private Ray cluster on this machine with {cpus} CPU(s){where}", flush=True
        )
        try:
            with environment_variable(API_SERVER_ENV, url):
                ray.init(
                    address="local",
                    num_cpus=cpus,
                    include_dashboard=dashboard,
                    dashboard_host=LOOPBACK,
                    dashboard_port=port,
                    log_to_driver=True,
                    configure_logging=False,
                )
            return
        except ValueError as error:
            # Another process bound the port between our check and Ray's: choose another.
            if "already occupied" not in str(error) or attempt == DASHBOARD_PORT_TRIES - 1:
                raise


def _free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@contextmanager
def environment_variable(name: str, value: str | None) -> Iterator[None]:
    """`name=value` in this process's environment (and so its children's) for the block, then
    as it was; None leaves it as it is."""
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


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
