"""Data jobs as Ray tasks on a cluster (`shard --address`, `prepare --address`).

Nothing funnels through the driver: a task reads its raw images from shared storage itself (the
project folder as every node sees it: the same path on a shared file system, or an
object-store URL that mirrors it, `--shared-root`), and `shard`'s tasks write their tars to
the destination themselves. The driver sends each task a plan (names, a slice of the manifest)
and gets back small results (image facts, a shard's index entry). Every argument and result is
measured where tasks are submitted and collected (`TaskDone.sent`, `.received`), so the bytes
through the driver are counted, not assumed. The driver submits a bounded number of tasks at a
time.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnpipe import storage
from attnpipe.errors import AttnpipeError
from attnpipe.raycluster import check_reachable, ray_connection

# Set to a folder to have the driver record which node ran each task (as training's trace).
TRACE_ENV = "ATTNPIPE_TRACE_DIR"
IN_FLIGHT_PER_CPU = 2  # tasks queued per cluster CPU: keeps every CPU busy, bounds the memory


class SharedStorageError(AttnpipeError, RuntimeError):
    """A task cannot see the project folder where the driver said it is."""


@dataclass(frozen=True)
class TaskDone:
    """One finished task: its place in the arguments, its result, and the bytes of its
    arguments (`sent`) and result (`received`) as serialized for the object store."""

    position: int
    result: Any
    sent: int
    received: int


def cluster_address(address: str | None) -> str | None:
    """The cluster a data stage runs on (`address`, else RAY_ADDRESS), checked; None: local.

    Checked before the stage starts, so that a wrong address fails in seconds and before any
    output of an earlier run is replaced.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_reachable(address)
    return address


def shared_root(project_root: Path, given: str | None) -> str:
    """Where every node sees the project folder: `given` (a path or an object-store URL),
    else the project root's own absolute path (a shared file system mounted at the same path)."""
    if given:
        return given.rstrip("/") if storage.is_url(given) else str(Path(given).absolute())
    return str(project_root.resolve())


def shared_location(root: str, name: str) -> str:
    """`name` (relative to the project root, or absolute on a shared file system) under `root`."""
    if not storage.is_url(root) and Path(name).is_absolute():
        return name
    return storage.join(root, name)


def _serialized_size(value: Any) -> int:
    from ray import cloudpickle

    return len(cloudpickle.dumps(value))


def run_tasks(
    function: Callable[..., Any], arguments: Iterable[tuple], address: str
) -> Iterator[TaskDone]:
    """`function(*args)` as a Ray task per item of `arguments`, each reported as it ends.

    Each task takes one CPU on the node with the fewest tasks in flight per CPU (`NodeLoad`),
    so every node gets work as soon as there are as many tasks as nodes, whatever the order in
    which Ray hears of them (SPREAD alone let one node take every task while another was still
    starting its workers). Placement is soft: a task whose node dies runs elsewhere, and is
    retried. An expected error raised in a task (an `AttnpipeError`) is raised here as itself.
    """
    with ray_connection(address):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(num_cpus=1)(function)
        load = NodeLoad()
        pending: dict[Any, tuple[int, int, str | None]] = {}
        items = enumerate(arguments)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < load.limit():
                item = next(items, None)
                if item is None:
                    exhausted = True
                    break
                node = load.take()
                # No node with a CPU yet (an autoscaler's first): Ray picks when one comes.
                strategy = NodeAffinitySchedulingStrategy(node, soft=True) if node else "SPREAD"
                ref = task.options(scheduling_strategy=strategy).remote(*item[1])
                pending[ref] = (item[0], _serialized_size(item[1]), node)
            if not pending:
                break
            [done], _ = ray.wait(list(pending), num_returns=1)
            position, sent, node = pending.pop(done)
            load.release(node)
            try:
                result = ray.get(done)
            except ray.exceptions.RayTaskError as error:
                if isinstance(error.cause, AttnpipeError):
                    raise error.cause from None
                raise
            yield TaskDone(position, result, sent, _serialized_size(result))


def alive_cpu_nodes() -> dict[str, int]:
    """{node id: whole CPUs} of the cluster's alive nodes that have a CPU."""
    import ray

    return {
        node["NodeID"]: int(node["Resources"].get("CPU", 0))
        for node in ray.nodes()
        if node["Alive"] and node["Resources"].get("CPU", 0) >= 1
    }


class NodeLoad:
    """Tasks in flight per alive node with CPUs. The node list (`read_nodes`) is read again
    every `REFRESH_S` seconds, so nodes that join (autoscaling) get work and gone ones none."""

    REFRESH_S = 5.0

    def __init__(self, read_nodes: Callable[[], dict[str, int]] = alive_cpu_nodes) -> None:
        self.read_nodes = read_nodes
        self.cpus: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}
        self.read_at: float | None = None
        self._refresh()

    def _refresh(self) -> None:
        if self.read_at is not None and time.monotonic() - self.read_at < self.REFRESH_S:
            return
        self.read_at = time.monotonic()
        self.cpus = self.read_nodes() or self.cpus
        for node in self.cpus:
            self.in_flight.setdefault(node, 0)

    def limit(self) -> int:
        """Tasks in flight at most: `IN_FLIGHT_PER_CPU` per CPU of the cluster."""
        self._refresh()
        return max(2, IN_FLIGHT_PER_CPU * sum(self.cpus.values()))

    def take(self) -> str | None:
        """The node for the next task: the fewest in flight per CPU (ties: the first listed);
        None while no node has a CPU."""
        if not self.cpus:
            return None
        node = min(self.cpus, key=lambda name: self.in_flight[name] / self.cpus[name])
        self.in_flight[node] += 1
        return node

    def release(self, node: str | None) -> None:
        if node is not None:
            self.in_flight[node] -= 1


def check_visible(root: str, probe: str) -> None:
    """On a node: fail in one line when the shared root does not hold `probe` (a file every
    run has, e.g. the pipeline's manifest or raw folder), so a node without the shared folder
    is told apart from a missing image."""
    if not storage.exists(shared_location(root, probe)):
        raise SharedStorageError(
            f"node {node_id()} cannot see {shared_location(root, probe)}: the project folder "
            "must be shared with every node at the same path (NFS, ...), or give --shared-root "
            "(a shared path or an object-store URL holding the project's data/)"
        )


def node_id() -> str:
    """The Ray node this task runs on."""
    import ray

    return ray.get_runtime_context().get_node_id()


def trace_task(kind: str, name: str, done: TaskDone, node: str) -> None:
    """Append {kind, name, node, sent, received} to `<ATTNPIPE_TRACE_DIR>/<kind>-tasks.jsonl`,
    when set."""
    folder = os.environ.get(TRACE_ENV)
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    record = {
        "kind": kind,
        "name": name,
        "node_id": node,
        "sent_bytes": done.sent,
        "received_bytes": done.received,
    }
    with (Path(folder) / f"{kind}-tasks.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
