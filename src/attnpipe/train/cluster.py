"""The driver's view of the Ray cluster: joining it, and deciding where training runs.

Devices are decided by the cluster, not by the machine the driver happens to run on: a job's
driver usually runs on a CPU-only head while the GPUs sit on worker nodes (or on node types the
autoscaler has not started yet). `train.use_gpu: auto` therefore asks Ray what the cluster has
or can add, and a run that will use GPUs first proves, with one small task placed like a
worker, that CUDA starts there: a driver too old for the locked torch fails the run at once
with what to do, instead of after minutes or, worse, as a silent CPU run.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from attnpipe.config import TrainConfig
from attnpipe.devices import CudaStatus, cuda_status, nvidia_gpus
from attnpipe.raycluster import ClusterError, connect_ray


@dataclass(frozen=True)
class ClusterCapacity:
    """Resources of the alive nodes, and the most the autoscaler's node types can add."""

    alive: dict[str, float]
    autoscaler: dict[str, float] | None  # None: no autoscaler (a fixed cluster)
    node_cpus: tuple[float, ...] = ()  # each alive node's CPUs (`workers: auto` without GPUs)

    def most(self, resource: str) -> float:
        alive = self.alive.get(resource, 0.0)
        if self.autoscaler is None:
            return alive
        return max(alive, float(self.autoscaler.get(resource, 0)))

    def describe(self, resource: str) -> str:
        scaled = (
            "no autoscaler"
            if self.autoscaler is None
            else f"up to {self.autoscaler.get(resource, 0):g} with the autoscaler's node types"
        )
        return f"{self.alive.get(resource, 0.0):g} on alive nodes, {scaled}"


def cluster_capacity() -> ClusterCapacity:
    """What the connected cluster has now and could grow to (Ray Train asks the same)."""
    import ray
    from ray._private.state import state

    alive = {key: float(value) for key, value in ray.cluster_resources().items()}
    try:
        scaled = state.get_max_resources_from_cluster_config()
    except Exception:  # an older GCS without the autoscaler's config: treat as fixed
        scaled = None
    node_cpus = tuple(
        float(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]
    )
    return ClusterCapacity(
        alive, {k: float(v) for k, v in scaled.items()} if scaled else None, node_cpus
    )


@dataclass(frozen=True)
class WorkerPlan:
    """How many DDP ranks a run starts (a count, or (min, max) for an elastic run), on what."""

    workers: int | tuple[int, int]
    use_gpu: bool

    @property
    def fewest(self) -> int:
        return self.workers[0] if isinstance(self.workers, tuple) else self.workers

    @property
    def most(self) -> int:
        return self.workers[1] if isinstance(self.workers, tuple) else self.workers

    def describe(self) -> str:
        """E.g. '3 worker(s), GPU' or '1-2 worker(s), elastic, CPU'."""
        device = "GPU" if self.use_gpu else "CPU"
        if isinstance(self.workers, tuple):
            return f"{self.fewest}-{self.most} worker(s), elastic, {device}"
        return f"{self.workers} worker(s), {device}"


Announce = Callable[[WorkerPlan], None] | None


def plan_workers(
    train: TrainConfig, use_gpu: bool, capacity: ClusterCapacity, where: str
) -> int | tuple[int, int]:
    """`train.workers` against the cluster: `auto` is one rank per GPU the cluster has or its
    autoscaler can add (each rank `gpus_per_worker` whole GPUs), without GPUs one rank per
    alive node that has a worker's CPUs; a number or an elastic range is kept as given."""
    if train.workers != "auto":
        return train.workers
    if use_gpu:
        ranks = int(capacity.most("GPU") // train.gpus_per_worker)
        what = f"{train.gpus_per_worker:g} GPU(s) per rank, {capacity.describe('GPU')} GPUs"
    else:
        ranks = sum(cpus >= train.cpus_per_worker for cpus in capacity.node_cpus)
        what = f"nodes with {train.cpus_per_worker:g} CPU(s): {ranks}"
    if ranks < 1:
        raise ClusterError(
            f"train.workers: auto finds no room for a rank on the Ray cluster {where} ({what}): "
            "add nodes, or lower train.gpus_per_worker or train.cpus_per_worker"
        )
    return ranks


def resolve_use_gpu(train: TrainConfig, capacity: ClusterCapacity, where: str) -> bool:
    """`train.use_gpu` decided against the cluster: auto = GPUs exist or can be added."""
    gpus = capacity.most("GPU")
    if train.use_gpu == "auto":
        return gpus > 0
    if train.use_gpu and gpus <= 0:
        raise ClusterError(
            f"train.use_gpu is true but the Ray cluster {where} has no GPUs "
            f"({capacity.describe('GPU')}): add GPU nodes, or set train.use_gpu: auto or false"
        )
    return bool(train.use_gpu)


def worker_resources(train: TrainConfig, use_gpu: bool) -> dict[str, float]:
    resources = {"CPU": float(train.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(train.gpus_per_worker)
    return resources


def check_capacity(
    train: TrainConfig, workers: int, use_gpu: bool, capacity: ClusterCapacity, where: str
) -> None:
    """Fail now, not after Ray's start timeout, when the workers can never all be placed."""
    for resource, each in worker_resources(train, use_gpu).items():
        needed, most = each * workers, capacity.most(resource)
        if needed > most + 1e-9:
            raise ClusterError(
                f"{workers} worker(s) need {needed:g} {resource} but the Ray cluster {where} "
                f"has {capacity.describe(resource)}: {_fit_advice(train, resource, each, most)}"
            )


def _fit_advice(train: TrainConfig, resource: str, each: float, most: float) -> str:
    """What makes the ranks fit. Never a fraction of a GPU per rank: NCCL refuses two ranks
    on one GPU ("Duplicate GPU detected")."""
    fits = int(most // each)
    if resource == "GPU":
        if fits < 1:
            return "add GPU nodes, or set train.use_gpu: false to train on CPUs"
        return (
            f"set train.workers: {fits} (or auto: one rank per GPU), or [1, {fits}] to run "
            "elastic, or add GPU nodes"
        )
    if fits < 1:
        return f"lower train.cpus_per_worker (to {most:g} at most), or add nodes"
    return f"set train.workers: {fits} or auto, lower train.cpus_per_worker, or add nodes"


def _probe() -> dict[str, Any]:
    status = cuda_status()
    return {**status.__dict__, "node": socket.gethostname()}


def probe_gpu_worker(train: TrainConfig) -> CudaStatus:
    """Run one task with a training worker's resources; raise if CUDA cannot start there."""
    import ray
    from ray.exceptions import GetTimeoutError

    resources = worker_resources(train, use_gpu=True)
    task = ray.remote(_probe).options(num_cpus=resources["CPU"], num_gpus=resources["GPU"])
    wait_s = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600"))
    pending = task.remote()
    try:
        found = ray.get(pending, timeout=wait_s)
    except GetTimeoutError:
        ray.cancel(pending, force=True)
        raise ClusterError(
            f"no node with {resources['GPU']:g} GPU and {resources['CPU']:g} CPU became "
            f"available within {wait_s:.0f} s: check the autoscaler (`ray status`, quotas)"
        ) from None
    node = found.pop("node")
    status = CudaStatus(**found)
    if not status.usable:
        raise ClusterError(f"a GPU worker on node {node} cannot use its GPU: {status.problem}")
    return status


@contextmanager
def training_cluster(
    train: TrainConfig, address: str | None, announce: Announce = None
) -> Iterator[WorkerPlan]:
    """Connected to the cluster the workers run on (`address`, RAY_ADDRESS, one this process
    already joined, else a private one on this machine); yields how many ranks start and
    whether they use GPUs. `announce` gets the plan as soon as it is made, before the GPU
    probe (which may refuse the run), so that what was planned is said either way.

    A private cluster is decided before it starts, so that a misfit is one line without Ray's
    start-up output, and it is shut down on exit.
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    given = train.workers if train.workers != "auto" else 1
    cpus = int((given[1] if isinstance(given, tuple) else given) * train.cpus_per_worker)
    private = not (address or ray.is_initialized())
    if private:
        plan = decide_local_devices(train, max(os.cpu_count() or 1, cpus), announce)
    started_here = connect_ray(address, cpus)
    try:
        yield plan if private else decide_devices(train, address, announce)
    finally:
        if started_here:
            ray.shutdown()


def decide_devices(
    train: TrainConfig, address: str | None, announce: Announce = None
) -> WorkerPlan:
    """How many ranks on what, decided from the connected cluster; checks that they fit
    and, for GPUs, that CUDA starts where they will run. Call after `connect_ray`."""
    where = f"at {address}" if address else "(local)"
    return _decide(train, cluster_capacity(), where, probe_gpu_worker, announce)


def decide_local_devices(train: TrainConfig, cpus: int, announce: Announce = None) -> WorkerPlan:
    """The same decision for a private cluster on this machine, made before Ray starts: the
    GPUs are the ones Ray would find here (through the NVIDIA driver, so a GPU whose CUDA
    cannot start is still seen, and reported, rather than silently skipped)."""
    capacity = ClusterCapacity(
        {"CPU": float(cpus), "GPU": float(nvidia_gpus())}, None, node_cpus=(float(cpus),)
    )
    return _decide(train, capacity, "(local)", _probe_here, announce)


def _decide(
    train: TrainConfig, capacity: ClusterCapacity, where: str, probe: Any, announce: Announce
) -> WorkerPlan:
    use_gpu = resolve_use_gpu(train, capacity, where)
    plan = WorkerPlan(plan_workers(train, use_gpu, capacity, where), use_gpu)
    if train.sync_batchnorm and plan.most > 1 and not use_gpu:
        raise ClusterError(
            "train.sync_batchnorm needs GPUs (PyTorch's SyncBatchNorm runs on CUDA only) but "
            "this run trains on CPUs: set train.sync_batchnorm: false, or add GPU nodes"
        )
    # An elastic run starts with what is there, down to its minimum.
    check_capacity(train, plan.fewest, use_gpu, capacity, where)
    if announce is not None:
        announce(plan)
    if use_gpu:
        probe(train)
    return plan


def _probe_here(train: TrainConfig) -> CudaStatus:
    status = cuda_status()
    if not status.usable:
        raise ClusterError(f"this machine's GPU cannot be used: {status.problem}")
    return status
