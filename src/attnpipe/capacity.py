"""Deciding where a Ray job's workers run (training's ranks, evaluation's scorers): the devices
and whether they fit, from the cluster's capacity.

Below `train` and `evaluate`, so both make the same decisions without importing each other.
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

from attnpipe.devices import CudaStatus, cuda_status, nvidia_gpus
from attnpipe.raycluster import ClusterError, connect_ray


@dataclass(frozen=True)
class WorkerShape:
    """What each worker of a job asks for, and the recipe keys that set it (named in refusals)."""

    use_gpu: bool | str  # True, False or "auto"
    cpus_per_worker: float
    gpus_per_worker: float
    section: str = "train"  # where `workers`, `cpus_per_worker`, `gpus_per_worker` are set
    device_key: str = "train.use_gpu"  # the setting that chose GPUs...
    device_gpu: str = "true"  # ...its value asking for them...
    device_others: str = "auto or false"  # ...and its other values
    sync_batchnorm: bool = False  # needs GPUs when there is more than one worker
    workers_key: str = ""  # the worker count's key, when not `<section>.workers`
    workers_auto: bool = True  # whether that key takes `auto`


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


Workers = int | str | tuple[int, int]  # a count, "auto", or an elastic (min, max)


@dataclass(frozen=True)
class WorkerPlan:
    """How many workers a job starts (a count, or (min, max) for an elastic run), on what."""

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
    shape: WorkerShape, workers: Workers, use_gpu: bool, capacity: ClusterCapacity, where: str
) -> int | tuple[int, int]:
    """`workers` against the cluster: `auto` is one per GPU the cluster has or its autoscaler
    can add (each `gpus_per_worker` whole GPUs), without GPUs one per alive node that has a
    worker's CPUs; a number or an elastic range is kept as given."""
    if workers != "auto":
        return workers
    if use_gpu:
        count = int(capacity.most("GPU") // max(shape.gpus_per_worker, 1e-9))
        found = f"{shape.gpus_per_worker:g} GPU(s) each, {capacity.describe('GPU')} GPUs"
    else:
        count = sum(cpus >= shape.cpus_per_worker for cpus in capacity.node_cpus)
        found = f"nodes with {shape.cpus_per_worker:g} CPU(s): {count}"
    if count < 1:
        raise ClusterError(
            f"{shape.section}.workers: auto finds no room for a worker on the Ray cluster "
            f"{where} ({found}): add nodes, or lower {shape.section}.gpus_per_worker or "
            f"{shape.section}.cpus_per_worker"
        )
    return count


def resolve_use_gpu(shape: WorkerShape, capacity: ClusterCapacity, where: str) -> bool:
    """`shape.use_gpu` decided against the cluster: auto = GPUs exist or can be added."""
    gpus = capacity.most("GPU")
    if shape.use_gpu == "auto":
        return gpus > 0
    if shape.use_gpu and gpus <= 0:
        raise ClusterError(
            f"{shape.device_key} is {shape.device_gpu} but the Ray cluster {where} has no GPUs "
            f"({capacity.describe('GPU')}): add GPU nodes, or set {shape.device_key}: "
            f"{shape.device_others}"
        )
    return bool(shape.use_gpu)


def worker_resources(shape: WorkerShape, use_gpu: bool) -> dict[str, float]:
    resources = {"CPU": float(shape.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(shape.gpus_per_worker)
    return resources


def check_capacity(
    shape: WorkerShape, workers: int, use_gpu: bool, capacity: ClusterCapacity, where: str
) -> None:
    """Fail now, not after Ray's start timeout, when the workers can never all be placed."""
    for resource, each in worker_resources(shape, use_gpu).items():
        needed, most = each * workers, capacity.most(resource)
        if needed > most + 1e-9:
            raise ClusterError(
                f"{workers} worker(s) need {needed:g} {resource} but the Ray cluster {where} "
                f"has {capacity.describe(resource)}: {_fit_advice(shape, resource, each, most)}"
            )


def _fit_advice(shape: WorkerShape, resource: str, each: float, most: float) -> str:
    """What makes the workers fit. Never a fraction of a GPU per worker: NCCL refuses two DDP
    ranks on one GPU ("Duplicate GPU detected")."""
    fits, key = int(most // each), shape.workers_key or f"{shape.section}.workers"
    if resource == "GPU":
        if most < 1:
            return f"add GPU nodes, or set {shape.device_key}: {shape.device_others}"
        if fits < 1:
            return f"lower {shape.section}.gpus_per_worker to {int(most)}, or add GPU nodes"
        # Only training's ranks can be elastic.
        elastic = f", or [1, {fits}] to run elastic" if shape.section == "train" else ""
        auto = " (or auto: one per GPU)" if shape.workers_auto else ""
        return f"lower {key} to {fits}{auto}{elastic}, or add GPU nodes"
    if fits < 1:
        return f"lower {shape.section}.cpus_per_worker (to {most:g} at most), or add nodes"
    auto = " (or auto)" if shape.workers_auto else ""
    return f"lower {key} to {fits}{auto}, or {shape.section}.cpus_per_worker, or add nodes"


def _probe() -> dict[str, Any]:
    status = cuda_status()
    return {**status.__dict__, "node": socket.gethostname()}


def probe_gpu_worker(shape: WorkerShape) -> CudaStatus:
    """Run one task with a worker's resources; raise if CUDA cannot start there."""
    import ray
    from ray.exceptions import GetTimeoutError

    resources = worker_resources(shape, use_gpu=True)
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
def worker_cluster(shape: WorkerShape, workers: int, address: str | None) -> Iterator[bool]:
    """`worker_plan_cluster` for a fixed number of workers: yields whether they use GPUs."""
    with worker_plan_cluster(shape, workers, address) as plan:
        yield plan.use_gpu


@contextmanager
def worker_plan_cluster(
    shape: WorkerShape, workers: Workers, address: str | None, announce: Announce = None
) -> Iterator[WorkerPlan]:
    """Connected to the cluster the workers run on (`address`, RAY_ADDRESS, one this process
    already joined, else a private one on this machine); yields how many start (`workers`
    resolved: auto counted, a range kept) and whether they use GPUs. `announce` gets the plan
    as soon as it is made, before the GPU probe (which may refuse the run), so that what was
    planned is said either way.

    A private cluster is decided before it starts, so that a misfit is one line without Ray's
    start-up output, and it is shut down on exit.
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    given = 1 if workers == "auto" else workers
    cpus = int((given[1] if isinstance(given, tuple) else given) * shape.cpus_per_worker)
    private = not (address or ray.is_initialized())
    if private:
        plan = plan_local_devices(shape, workers, max(os.cpu_count() or 1, cpus), announce)
    started_here = connect_ray(address, cpus)
    try:
        yield plan if private else plan_devices(shape, workers, address, announce)
    finally:
        if started_here:
            ray.shutdown()


def decide_devices(shape: WorkerShape, workers: int, address: str | None) -> bool:
    """Whether `workers` workers use GPUs (`plan_devices` for a fixed count)."""
    return plan_devices(shape, workers, address).use_gpu


def plan_devices(
    shape: WorkerShape, workers: Workers, address: str | None, announce: Announce = None
) -> WorkerPlan:
    """How many workers on what, decided from the connected cluster; checks that they fit
    and, for GPUs, that CUDA starts where they will run. Call after `connect_ray`."""
    where = f"at {address}" if address else "(local)"
    return _decide(shape, workers, cluster_capacity(), where, probe_gpu_worker, announce)


def plan_local_devices(
    shape: WorkerShape, workers: Workers, cpus: int, announce: Announce = None
) -> WorkerPlan:
    """The same decision for a private cluster on this machine, made before Ray starts: the
    GPUs are the ones Ray would find here (through the NVIDIA driver, so a GPU whose CUDA
    cannot start is still seen, and reported, rather than silently skipped)."""
    capacity = ClusterCapacity(
        {"CPU": float(cpus), "GPU": float(nvidia_gpus())}, None, node_cpus=(float(cpus),)
    )
    return _decide(shape, workers, capacity, "(local)", _probe_here, announce)


def _decide(
    shape: WorkerShape,
    workers: Workers,
    capacity: ClusterCapacity,
    where: str,
    probe: Any,
    announce: Announce = None,
) -> WorkerPlan:
    use_gpu = resolve_use_gpu(shape, capacity, where)
    plan = WorkerPlan(plan_workers(shape, workers, use_gpu, capacity, where), use_gpu)
    if shape.sync_batchnorm and plan.most > 1 and not use_gpu:
        raise ClusterError(
            "train.sync_batchnorm needs GPUs (PyTorch's SyncBatchNorm runs on CUDA only) but "
            "this run trains on CPUs: set train.sync_batchnorm: false, or add GPU nodes"
        )
    # An elastic run starts with what is there, down to its minimum.
    check_capacity(shape, plan.fewest, use_gpu, capacity, where)
    if announce is not None:
        announce(plan)
    if use_gpu:
        probe(shape)
    return plan


def _probe_here(shape: WorkerShape) -> CudaStatus:
    status = cuda_status()
    if not status.usable:
        raise ClusterError(f"this machine's GPU cannot be used: {status.problem}")
    return status
