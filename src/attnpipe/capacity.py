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
from collections.abc import Iterator
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


@dataclass(frozen=True)
class ClusterCapacity:
    """Resources of the alive nodes, and the most the autoscaler's node types can add."""

    alive: dict[str, float]
    autoscaler: dict[str, float] | None  # None: no autoscaler (a fixed cluster)

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
    return ClusterCapacity(alive, {k: float(v) for k, v in scaled.items()} if scaled else None)


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
                f"has {capacity.describe(resource)}: lower {shape.section}.workers or "
                f"{shape.section}.{resource.lower()}s_per_worker, or add nodes"
            )


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
    """Connected to the cluster the workers run on (`address`, RAY_ADDRESS, one this process
    already joined, else a private one on this machine); yields whether they use GPUs.

    A private cluster is decided before it starts, so that a misfit is one line without Ray's
    start-up output, and it is shut down on exit.
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    cpus = int(workers * shape.cpus_per_worker)
    private = not (address or ray.is_initialized())
    if private:
        use_gpu = decide_local_devices(shape, workers, max(os.cpu_count() or 1, cpus))
    started_here = connect_ray(address, cpus)
    try:
        yield use_gpu if private else decide_devices(shape, workers, address)
    finally:
        if started_here:
            ray.shutdown()


def decide_devices(shape: WorkerShape, workers: int, address: str | None) -> bool:
    """Whether the workers use GPUs, decided from the connected cluster; checks that they fit
    and, for GPUs, that CUDA starts where they will run. Call after `connect_ray`."""
    where = f"at {address}" if address else "(local)"
    return _decide(shape, workers, cluster_capacity(), where, probe=probe_gpu_worker)


def decide_local_devices(shape: WorkerShape, workers: int, cpus: int) -> bool:
    """The same decision for a private cluster on this machine, made before Ray starts: the
    GPUs are the ones Ray would find here (through the NVIDIA driver, so a GPU whose CUDA
    cannot start is still seen, and reported, rather than silently skipped)."""
    capacity = ClusterCapacity({"CPU": float(cpus), "GPU": float(nvidia_gpus())}, None)
    return _decide(shape, workers, capacity, "(local)", probe=_probe_here)


def _decide(
    shape: WorkerShape, workers: int, capacity: ClusterCapacity, where: str, probe: Any
) -> bool:
    use_gpu = resolve_use_gpu(shape, capacity, where)
    if shape.sync_batchnorm and workers > 1 and not use_gpu:
        raise ClusterError(
            "train.sync_batchnorm needs GPUs (PyTorch's SyncBatchNorm runs on CUDA only) but "
            "this run trains on CPUs: set train.sync_batchnorm: false, or add GPU nodes"
        )
    check_capacity(shape, workers, use_gpu, capacity, where)
    if use_gpu:
        probe(shape)
    return use_gpu


def _probe_here(shape: WorkerShape) -> CudaStatus:
    status = cuda_status()
    if not status.usable:
        raise ClusterError(f"this machine's GPU cannot be used: {status.problem}")
    return status
