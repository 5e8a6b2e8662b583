"""Deciding where a Ray job's workers run (training's ranks, evaluation's scorers): the devices
and whether they fit, from the cluster's capacity.

Below `train` and `evaluate`, so both make the same decisions without importing each other.
Devices are decided by the cluster, not by the machine the driver happens to run on: a job's
driver usually runs on a CPU-only head while the GPUs sit on worker nodes (or on node types the
autoscaler has not started yet). `train.use_gpu: auto` therefore asks Ray what the cluster has
or can add, and a run that will use GPUs first proves, with one small task placed like a
worker, that CUDA starts there: a driver too old for the locked torch fails the run at once
with what to do, instead of after minutes or, worse, as a silent CPU run.

Whether workers fit is decided per node (`attnpipe.placement`): each worker is a bundle that
one node must hold, so `auto` and the capacity check count whole workers per node, never the
cluster's sums, and a refusal names the node types that hold none and the setting that would
change that.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from attnpipe.devices import CudaStatus, cuda_status, nvidia_gpus
from attnpipe.placement import ClusterCapacity, NodeType, Share, live_capacity, pack, placed
from attnpipe.raycluster import (
    FIXED_START_TIMEOUT_S,
    START_TIMEOUT_ENV,
    ClusterError,
    connect_ray,
    private_cluster_cpus,
)


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


def cluster_capacity() -> ClusterCapacity:
    """The connected cluster's nodes by type: alive ones, and the autoscaler's node types."""
    return live_capacity()


Workers = int | str | tuple[int, int]  # a count, "auto", or an elastic (min, max)


@dataclass(frozen=True)
class WorkerPlan:
    """How many workers a job starts (a count, or (min, max) for an elastic run), on what."""

    workers: int | tuple[int, int]
    use_gpu: bool
    # Where the workers go (an elastic run: as many as fit, up to its maximum).
    shares: tuple[Share, ...] = field(default=(), compare=False)

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
    """`workers` against the cluster: `auto` is `auto_workers`; a number or an elastic range
    is kept as given."""
    if workers != "auto":
        return workers
    count = auto_workers(shape, use_gpu, capacity)
    if count < 1:
        bundle = worker_resources(shape, use_gpu)
        why = "; ".join(node_notes(shape, bundle, capacity)) or _more_nodes(shape, bundle, capacity)
        raise ClusterError(
            f"{shape.section}.workers: auto finds no room for a worker of {_bundle(bundle)} on "
            f"the Ray cluster {where} ({capacity.describe(_scarce(bundle))}): {why}"
        )
    return count


def auto_workers(shape: WorkerShape, use_gpu: bool, capacity: ClusterCapacity) -> int:
    """What `auto` counts. With GPUs: the whole workers one node holds, times the nodes of its
    type alive or addable (alive first, `placement.pack`). Without: one per alive node that
    holds a worker (a head without CPUs, as on KubeRay, does not count)."""
    bundle = worker_resources(shape, use_gpu)
    if use_gpu:
        return placed(pack(bundle, capacity, None))
    return sum(kind.alive for kind in capacity.node_types if kind.holds(bundle))


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
) -> tuple[Share, ...]:
    """Where the workers go, each on one node (`placement.pack`); fails now, not after Ray's
    start timeout, when they can never all be placed, saying what fits and what would."""
    bundle = worker_resources(shape, use_gpu)
    shares = tuple(pack(bundle, capacity, workers))
    fits = placed(shares)
    if fits >= workers:
        return shares
    found = f"{fits} fit: " + ", ".join(share.describe() for share in shares) if fits else ""
    said = [found or "none fits", *node_notes(shape, bundle, capacity)]
    raise ClusterError(
        f"{workers} worker(s) of {_bundle(bundle)} do not fit on the Ray cluster {where} "
        f"({capacity.describe(_scarce(bundle))}): {'; '.join(said)}; "
        f"{_fit_advice(shape, bundle, fits, capacity)}"
    )


def _fit_advice(
    shape: WorkerShape, bundle: dict[str, float], fits: int, capacity: ClusterCapacity
) -> str:
    """What makes the workers fit. Never a fraction of a GPU per worker: NCCL refuses two DDP
    ranks on one GPU ("Duplicate GPU detected")."""
    key = shape.workers_key or f"{shape.section}.workers"
    if fits < 1:
        return _more_nodes(shape, bundle, capacity)
    auto = " (or auto)" if shape.workers_auto else ""
    # Only training's ranks can be elastic.
    elastic = f", or [1, {fits}] to run elastic" if shape.section == "train" else ""
    return f"lower {key} to {fits}{auto}{elastic}, or {_more_nodes(shape, bundle, capacity)}"


def _more_nodes(shape: WorkerShape, bundle: dict[str, float], capacity: ClusterCapacity) -> str:
    if bundle.get("GPU", 0) <= 0:
        return "add nodes"
    if capacity.most("GPU") <= 0:
        return f"add GPU nodes, or set {shape.device_key}: {shape.device_others}"
    return "add GPU nodes"


def node_notes(
    shape: WorkerShape, bundle: dict[str, float], capacity: ClusterCapacity
) -> list[str]:
    """The node types (alive or addable) that hold fewer workers than their GPUs would, and
    the setting that changes that, e.g. 'gpu_1x, gpu_1x_spot node(s) (4 CPU, 1 GPU) hold
    none: lower train.cpus_per_worker to 4 to use them'. Equal notes are said once."""
    notes: dict[tuple[str, str], list[str]] = {}
    for kind in capacity.node_types:
        note = _node_note(shape, bundle, kind) if kind.alive or kind.addable != 0 else ""
        if note:
            notes.setdefault((kind.describe(), note), []).append(kind.name)
    return [
        f"{', '.join(names)} node(s) ({shown}) {note}"
        if all(names)
        else f"node(s) of {shown} {note}"
        for (shown, note), names in notes.items()
    ]


def _node_note(shape: WorkerShape, bundle: dict[str, float], kind: NodeType) -> str:
    """Why one node of `kind` holds fewer workers than it has room for, and what fixes it."""
    cpus, gpus = kind.resources.get("CPU", 0.0), kind.resources.get("GPU", 0.0)
    need_cpu, need_gpu = bundle.get("CPU", 0.0), bundle.get("GPU", 0.0)
    if cpus <= 0 or (need_gpu > 0 and gpus < 1):
        return ""  # no setting of the worker's makes it hold one
    slots = int(gpus // need_gpu) if need_gpu > 0 else 1  # the workers its GPUs hold
    holds, fixes = kind.holds(bundle), []
    if need_gpu > 0 and slots < 1:
        fixes.append(f"lower {shape.section}.gpus_per_worker to {gpus:g}")
        slots = 1
    if cpus < need_cpu * slots - 1e-9:
        fixes.append(f"lower {shape.section}.cpus_per_worker to {cpus / slots:g}")
    if not fixes or holds >= slots:
        return ""
    goal = "to use them" if holds == 0 else f"to use all {gpus:g} GPUs of each"
    return f"hold {holds or 'none'}{' each' if holds else ''}: {' and '.join(fixes)} {goal}"


def _bundle(bundle: dict[str, float]) -> str:
    """E.g. '10 CPU + 1 GPU'."""
    return " + ".join(f"{value:g} {key}" for key, value in bundle.items() if value > 0)


def _scarce(bundle: dict[str, float]) -> str:
    return "GPU" if bundle.get("GPU", 0) > 0 else "CPU"


def _probe() -> dict[str, Any]:
    status = cuda_status()
    return {**status.__dict__, "node": socket.gethostname()}


def node_start_wait_s() -> float:
    """How long the GPU probe waits for a node that holds it: a fixed-size run's placement
    wait (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 600 s unless set), elastic run or not. The
    probe is what waits for the autoscaler to boot a GPU node (minutes); an elastic run's
    short wait is for re-placing ranks on nodes that are up, and is set after the probe."""
    return float(os.environ.get(START_TIMEOUT_ENV, str(FIXED_START_TIMEOUT_S)))


def probe_gpu_worker(shape: WorkerShape) -> CudaStatus:
    """Run one task with a worker's resources; raise if CUDA cannot start there."""
    import ray
    from ray.exceptions import GetTimeoutError

    resources = worker_resources(shape, use_gpu=True)
    task = ray.remote(_probe).options(num_cpus=resources["CPU"], num_gpus=resources["GPU"])
    wait_s = node_start_wait_s()
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
    cpus = cpus_needed(shape, workers)
    private = not (address or ray.is_initialized())
    if private:
        plan = plan_local_devices(shape, workers, private_cluster_cpus(cpus), announce)
    started_here = connect_ray(address, cpus)
    try:
        yield plan if private else plan_devices(shape, workers, address, announce)
    finally:
        if started_here:
            ray.shutdown()


def cpus_needed(shape: WorkerShape, workers: Workers) -> int:
    """CPUs a private cluster on this machine needs: every worker's (auto: one worker's; an
    elastic range: its maximum's)."""
    given = 1 if workers == "auto" else workers
    return int((given[1] if isinstance(given, tuple) else given) * shape.cpus_per_worker)


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
    return _decide(shape, workers, local_capacity(cpus), "(local)", _probe_here, announce)


def local_capacity(cpus: int) -> ClusterCapacity:
    """A private cluster on this machine: one node, `cpus` CPUs and the GPUs Ray finds here."""
    return ClusterCapacity.fixed({"CPU": float(cpus), "GPU": float(nvidia_gpus())})


def decide_plan(
    shape: WorkerShape, workers: Workers, capacity: ClusterCapacity, where: str
) -> WorkerPlan:
    """How many workers on what, and on which nodes, from `capacity` alone (nothing started,
    no probe): the decision a run makes, and what `attnpipe plan` prints."""
    use_gpu = resolve_use_gpu(shape, capacity, where)
    plan = WorkerPlan(plan_workers(shape, workers, use_gpu, capacity, where), use_gpu)
    if shape.sync_batchnorm and plan.most > 1 and not use_gpu:
        raise ClusterError(
            "train.sync_batchnorm needs GPUs (PyTorch's SyncBatchNorm runs on CUDA only) but "
            "this run trains on CPUs: set train.sync_batchnorm: false, or add GPU nodes"
        )
    # An elastic run starts with what is there, down to its minimum, and grows to its
    # maximum as far as the nodes hold it.
    shares = check_capacity(shape, plan.fewest, use_gpu, capacity, where)
    if plan.most > plan.fewest:
        shares = tuple(pack(worker_resources(shape, use_gpu), capacity, plan.most))
    return replace(plan, shares=shares)


def _decide(
    shape: WorkerShape,
    workers: Workers,
    capacity: ClusterCapacity,
    where: str,
    probe: Any,
    announce: Announce = None,
) -> WorkerPlan:
    plan = decide_plan(shape, workers, capacity, where)
    if announce is not None:
        announce(plan)
    if plan.use_gpu:
        probe(shape)
    return plan


def _probe_here(shape: WorkerShape) -> CudaStatus:
    status = cuda_status()
    if not status.usable:
        raise ClusterError(f"this machine's GPU cannot be used: {status.problem}")
    return status
