"""Data jobs as Ray tasks on a cluster (`shard --address`, `prepare --address`).

Nodes do not share the driver's disk. A task receives what it needs through Ray's object store
(the raw bytes of its images), stages them in a temporary folder on its node, runs the same
function a local run does, and sends its results back; the driver writes every output file
itself, so the outputs are byte-identical to a local run's. The driver submits a bounded number
of tasks at a time, so it never holds more than those tasks' inputs in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from attnpipe.errors import AttnpipeError
from attnpipe.raycluster import check_reachable, ray_connection

# Set to a folder to have the driver record which node ran each task (as training's trace).
TRACE_ENV = "ATTNPIPE_TRACE_DIR"
IN_FLIGHT_PER_CPU = 2  # tasks queued per cluster CPU: keeps every CPU busy, bounds the memory


def cluster_address(address: str | None) -> str | None:
    """The cluster a data stage runs on (`address`, else RAY_ADDRESS), checked; None: local.

    Checked before the stage starts, so that a wrong address fails in seconds and before any
    output of an earlier run is replaced.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_reachable(address)
    return address


def run_tasks(
    function: Callable[..., Any], arguments: Iterable[tuple], address: str
) -> Iterator[tuple[int, Any]]:
    """`function(*args)` as a Ray task per item of `arguments`; (position, result) as each ends.

    Tasks are spread over the nodes, one CPU each, and retried when their node dies. An
    expected error raised in a task (an `AttnpipeError`) is raised here as itself.
    """
    with ray_connection(address):
        import ray

        task = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(function)
        limit = max(2, IN_FLIGHT_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))
        pending: dict[Any, int] = {}
        items = enumerate(arguments)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < limit:
                item = next(items, None)
                if item is None:
                    exhausted = True
                else:
                    pending[task.remote(*item[1])] = item[0]
            if not pending:
                break
            [done], _ = ray.wait(list(pending), num_returns=1)
            position = pending.pop(done)
            try:
                yield position, ray.get(done)
            except ray.exceptions.RayTaskError as error:
                if isinstance(error.cause, AttnpipeError):
                    raise error.cause from None
                raise


def read_or_none(path: Path) -> bytes | None:
    """The file's bytes, or None when it cannot be read (the caller reports why)."""
    try:
        return path.read_bytes()
    except OSError:
        return None


def read_inputs(root: Path, names: Iterable[str]) -> dict[str, bytes]:
    """{name: bytes} of each file `root / name` that can be read (a task reports the others)."""
    found = {name: read_or_none(root / name) for name in names}
    return {name: data for name, data in found.items() if data is not None}


def staged_name(name: str) -> str:
    """`name` made relative and kept inside the staging folder (no leading /, no `..`)."""
    parts = PurePosixPath(name).parts
    return "/".join("__" if part == ".." else part for part in parts if part != "/")


def stage_files(folder: Path, files: dict[str, bytes]) -> None:
    """Write `files` ({relative name: bytes}) under `folder`, as they were on the driver."""
    for name, data in files.items():
        target = folder / staged_name(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def node_id() -> str:
    """The Ray node this task runs on."""
    import ray

    return ray.get_runtime_context().get_node_id()


def trace_task(kind: str, name: str, node: str) -> None:
    """Append {kind, name, node} to `<ATTNPIPE_TRACE_DIR>/<kind>-tasks.jsonl`, when set."""
    folder = os.environ.get(TRACE_ENV)
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    with (Path(folder) / f"{kind}-tasks.jsonl").open("a") as handle:
        handle.write(json.dumps({"kind": kind, "name": name, "node_id": node}) + "\n")
