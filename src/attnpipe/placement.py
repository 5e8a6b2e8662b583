"""Where workers fit: a Ray cluster's nodes, alive or addable, and workers packed onto them.

A worker is a bundle (its CPUs, GPUs...) that Ray places on one node, so what counts is how
many whole workers each node holds, never the cluster's sums: four 1-GPU nodes of 4 CPUs add
4 GPUs that a 10-CPU worker can never use, and 2 x 96 + 32 CPUs do not hold 16 workers of 14
CPUs. The nodes come from a live cluster (its alive nodes, and the node types its autoscaler
may add) or from a cluster launcher's file (`ray up` format, as cluster/aws.yaml), so that a
plan needs no cluster. Workers go on alive nodes first, then on added nodes: whole nodes of
the types that hold most workers per node, the rest on the smallest type that holds it, within
each type's max_workers and the cluster's own.

Below `train` and `evaluate` (through `attnpipe.capacity`), which decide from it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from attnpipe.raycluster import ClusterError

# The label an autoscaler (v2, KubeRay, the fake multi-node provider) gives a node it starts.
NODE_TYPE_LABEL = "ray.io/node-group"
# What a Ray node reports that is not a worker's to ask for: its own address, the object store.
NOT_FOR_WORKERS = ("node:", "object_store_memory")
# The cluster launcher's default for a file without `max_workers` (ray/autoscaler/*/defaults).
RAY_DEFAULT_MAX_WORKERS = 2


@dataclass(frozen=True)
class NodeType:
    """Nodes of one kind: the resources one node offers, how many are alive, how many there
    can be (the autoscaler's `max_workers` for the type; None: no limit)."""

    name: str
    resources: Mapping[str, float]
    alive: int = 0
    most: int | None = 0

    @property
    def addable(self) -> int | None:
        """Nodes of this type the autoscaler may still add (None: no limit of its own)."""
        return None if self.most is None else max(0, self.most - self.alive)

    def holds(self, bundle: Mapping[str, float]) -> int:
        """Whole workers of `bundle` one node holds."""
        counts = [
            math.floor(self.resources.get(key, 0.0) / need + 1e-9)
            for key, need in bundle.items()
            if need > 0
        ]
        return max(0, min(counts)) if counts else 0

    def describe(self) -> str:
        """E.g. '96 CPU, 8 GPU'."""
        shown = [f"{self.resources.get(key, 0.0):g} {key}" for key in ("CPU", "GPU")]
        return ", ".join(shown)

    @property
    def label(self) -> str:
        """E.g. 'gpu_8x_a100 node(s)'; alive nodes of no known type: 'node(s) of 8 CPU, 3 GPU'."""
        return f"{self.name} node(s)" if self.name else f"node(s) of {self.describe()}"


@dataclass(frozen=True)
class ClusterCapacity:
    """A cluster's nodes by type, and what its autoscaler may add: `max_added` nodes at most
    over all types (None: the types' own limits only), within `max_resources` (totals)."""

    node_types: tuple[NodeType, ...]
    autoscaled: bool = False
    max_added: int | None = None
    max_resources: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def fixed(cls, *nodes: Mapping[str, float]) -> ClusterCapacity:
        """A cluster without an autoscaler: these alive nodes (equal ones grouped)."""
        counts = Counter(tuple(sorted(node.items())) for node in nodes)
        types = tuple(
            NodeType("", dict(key), alive=count, most=count) for key, count in counts.items()
        )
        return cls(types)

    @property
    def alive(self) -> dict[str, float]:
        """The alive nodes' resources, summed."""
        total: Counter[str] = Counter()
        for kind in self.node_types:
            for key, value in kind.resources.items():
                total[key] += value * kind.alive
        return dict(total)

    @property
    def node_budget(self) -> float:
        """Nodes the autoscaler may add over all types (inf: only the types' own limits)."""
        return math.inf if self.max_added is None else self.max_added

    def alive_only(self) -> ClusterCapacity:
        """The same cluster without its autoscaler: the alive nodes only."""
        types = tuple(
            NodeType(kind.name, kind.resources, kind.alive, kind.alive)
            for kind in self.node_types
            if kind.alive
        )
        return ClusterCapacity(types)

    def most(self, resource: str) -> float:
        """`resource` on the alive nodes and on the nodes the autoscaler may add (those with
        most of it first, within its limits); inf: no limit."""
        used, budget = Counter(self.alive), self.node_budget
        total = used.get(resource, 0.0)
        for kind in sorted(self.node_types, key=lambda kind: -_get(kind, resource)):
            each, room = _get(kind, resource), _room(kind)
            nodes = min(room, budget, _nodes_within(kind, used, self.max_resources))
            if each <= 0 or nodes <= 0:
                continue
            if nodes == math.inf:
                return math.inf
            total, budget = total + nodes * each, budget - nodes
            used.update({key: value * nodes for key, value in kind.resources.items()})
        return total

    def describe(self, resource: str) -> str:
        """E.g. '0 GPU on alive nodes, up to 20 with the autoscaler's node types'."""
        alive = f"{self.alive.get(resource, 0.0):g} {resource} on alive nodes"
        if not self.autoscaled:
            return f"{alive}, no autoscaler"
        return f"{alive}, up to {self.most(resource):g} with the autoscaler's node types"


@dataclass(frozen=True)
class Share:
    """Workers placed on nodes of one type: alive ones, or ones the autoscaler adds."""

    node_type: NodeType
    nodes: int
    per_node: int  # the most one node holds
    workers: int
    alive: bool

    def describe(self) -> str:
        """E.g. '8 on each of 2 gpu_8x_a100 nodes (added)'."""
        state = "alive" if self.alive else "added"
        nodes = f"{self.nodes} {self.node_type.label}"
        if self.workers == self.nodes * self.per_node:
            return f"{self.per_node} on each of {nodes} ({state})"
        return f"{self.workers} on {nodes} ({state}, {self.per_node} each at most)"


def pack(
    bundle: Mapping[str, float], capacity: ClusterCapacity, workers: int | None
) -> list[Share]:
    """Where `workers` workers of `bundle` go (None: as many as fit), alive nodes first, then
    nodes the autoscaler adds (`_added_nodes`). Fewer than asked when they do not fit."""
    shares, left = [], math.inf if workers is None else workers
    for kind in capacity.node_types:
        per_node = kind.holds(bundle)
        if kind.alive and per_node and left > 0:
            count = min(left, kind.alive * per_node)
            shares.append(Share(kind, math.ceil(count / per_node), per_node, int(count), True))
            left -= count
    added: dict[int, tuple[int, float]] = {}  # node type's index: (nodes, workers)
    for index, nodes, count in _added_nodes(bundle, capacity, left):
        before = added.get(index, (0, 0))
        added[index] = (before[0] + nodes, before[1] + count)
    for index, (nodes, count) in sorted(added.items()):
        kind = capacity.node_types[index]
        shares.append(Share(kind, nodes, kind.holds(bundle), int(count), False))
    return shares


def _added_nodes(
    bundle: Mapping[str, float], capacity: ClusterCapacity, left: float
) -> Iterator[tuple[int, int, float]]:
    """(node type's index, nodes, workers on them) the autoscaler adds for `left` workers, as
    its bin packing would: whole nodes of the type that holds most per node, and the rest on
    one node of the smallest type that holds it all (one worker on a 1-GPU node, not on an
    8-GPU one); within each type's max_workers, the cluster's and its resource limits."""
    room = [_room(kind) for kind in capacity.node_types]
    used, budget = Counter(capacity.alive), capacity.node_budget
    while left > 0 and budget > 0:
        open_types = [
            (kind.holds(bundle), index)
            for index, kind in enumerate(capacity.node_types)
            if kind.holds(bundle)
            and room[index] > 0
            and _nodes_within(kind, used, capacity.max_resources) > 0
        ]
        if not open_types:
            return
        finishing = [(per_node, index) for per_node, index in open_types if per_node >= left]
        per_node, index = min(finishing) if finishing else max(open_types, key=lambda t: t[0])
        kind = capacity.node_types[index]
        within = _nodes_within(kind, used, capacity.max_resources)
        whole = math.inf if left == math.inf else left // per_node  # (inf // n is nan)
        nodes = 1 if finishing else min(room[index], budget, within, whole)
        if nodes == math.inf:
            raise ClusterError(
                f"the autoscaler's node type {kind.name} has no max_workers, nor the cluster: "
                "the workers that fit cannot be counted; give the workers as a number, or set "
                "max_workers"
            )
        count = min(left, nodes * per_node)
        yield index, int(nodes), count
        left, budget, room[index] = left - count, budget - nodes, room[index] - nodes
        used.update({key: value * nodes for key, value in kind.resources.items()})


def placed(shares: Sequence[Share]) -> int:
    return sum(share.workers for share in shares)


def _room(kind: NodeType) -> float:
    return math.inf if kind.addable is None else kind.addable


def _get(kind: NodeType, resource: str) -> float:
    return float(kind.resources.get(resource, 0.0))


def _nodes_within(kind: NodeType, used: Mapping[str, float], limits: Mapping[str, float]) -> float:
    """Nodes of `kind` the autoscaler's resource limits (totals) still allow."""
    allowed = math.inf
    for key, limit in limits.items():
        each = _get(kind, key)
        if each > 0:
            allowed = min(allowed, max(0, math.floor((limit - used.get(key, 0.0)) / each)))
    return allowed


# ----------------------------------------------------------------------- a cluster's file
def capacity_from_file(path: Path) -> ClusterCapacity:
    """The cluster a `ray up` file describes, before it exists: its head and min_workers nodes
    alive, each type's max_workers and the file's own `max_workers` as the autoscaler's limits."""
    data = _read_cluster_file(path)
    types_given = data.get("available_node_types")
    if not isinstance(types_given, dict) or not types_given:
        raise ClusterError(
            f"{path} has no available_node_types: expected a `ray up` cluster file with node "
            "types and their resources, as cluster/aws.yaml"
        )
    head = data.get("head_node_type")
    overall = int(data.get("max_workers", RAY_DEFAULT_MAX_WORKERS))
    types, started = [], 0
    for name, spec in types_given.items():
        resources = (spec or {}).get("resources")
        if not isinstance(resources, dict):
            raise ClusterError(
                f"{path}: node type {name} declares no resources: add resources: {{CPU: .., "
                "GPU: ..}} with the instance's vCPUs and GPUs (the autoscaler's own guess is "
                "made on the cloud, not here)"
            )
        least = int(spec.get("min_workers", 0))
        # Ray's defaults: the head type adds no workers, another type up to the cluster's.
        most = int(spec.get("max_workers", 0 if name == head else overall))
        own = 1 if name == head else 0
        started += least
        floats = {str(key): float(value) for key, value in resources.items()}
        types.append(NodeType(str(name), floats, alive=own + least, most=own + max(most, least)))
    return ClusterCapacity(tuple(types), autoscaled=True, max_added=max(0, overall - started))


def _read_cluster_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ClusterError(f"no cluster file {path}: give a `ray up` file, e.g. cluster/aws.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ClusterError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ClusterError(f"{path} is not a cluster file: expected a mapping of settings")
    if data.get("kind") in ("RayCluster", "RayJob", "RayService"):
        raise ClusterError(
            f"{path} is a KubeRay {data['kind']}: plan against the running cluster instead "
            "(--address), or give a `ray up` file (cluster/aws.yaml, cluster/gcp.yaml)"
        )
    return data


# ----------------------------------------------------------------------- a live cluster
def live_capacity() -> ClusterCapacity:
    """The connected cluster: its alive nodes, grouped by node type where the autoscaler
    named it (a node's label, else the type whose declared resources it has), and the types
    the autoscaler may add (None of them: a fixed cluster)."""
    import ray
    from ray._private.state import state

    try:
        config = state.get_cluster_config()
    except Exception:  # an older GCS without the autoscaler's config: treat as fixed
        config = None
    groups = list(config.node_group_configs) if config else []
    declared = [
        NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, 0, _max_count(g))
        for g in groups
        if g.resources
    ]
    alive = [node for node in ray.nodes() if node.get("Alive")]
    limits = {k: float(v) for k, v in config.max_resources.items()} if config else {}
    return ClusterCapacity(
        tuple(group_alive_nodes(alive, declared)), autoscaled=bool(declared), max_resources=limits
    )


def _max_count(group: Any) -> int | None:
    return None if group.max_count == -1 else int(group.max_count)


def group_alive_nodes(
    nodes: Sequence[Mapping[str, Any]], declared: Sequence[NodeType]
) -> list[NodeType]:
    """`declared` node types with their alive nodes counted, then the alive nodes no type
    claims, grouped by their resources (equal but for memory: the smallest memory kept). A
    node's resources are its totals (what a worker gets once the work there now ends), less
    what no worker asks for."""
    by_name = {kind.name: kind for kind in declared}
    alive: Counter[str] = Counter()
    others: dict[tuple[tuple[str, float], ...], list[dict[str, float]]] = {}
    for node in nodes:
        resources = {
            str(key): float(value)
            for key, value in node.get("Resources", {}).items()
            if not str(key).startswith(NOT_FOR_WORKERS)
        }
        name = node.get("Labels", {}).get(NODE_TYPE_LABEL)
        if name not in by_name:
            name = next((kind.name for kind in declared if _declares(kind, resources)), None)
        if name is not None:
            alive[name] += 1
            continue
        key = tuple(sorted((k, v) for k, v in resources.items() if k != "memory"))
        others.setdefault(key, []).append(resources)
    types = [
        NodeType(kind.name, kind.resources, (up := alive[kind.name]), _at_least(kind.most, up))
        for kind in declared
    ]
    for alike in others.values():
        resources = min(alike, key=lambda found: found.get("memory", 0.0))
        types.append(NodeType("", resources, len(alike), len(alike)))
    return types


def _declares(kind: NodeType, resources: Mapping[str, float]) -> bool:
    """Whether a node has exactly the resources its type declares (the cluster launcher
    starts Ray on a node with its type's `resources`)."""
    return all(abs(resources.get(key, 0.0) - value) < 1e-6 for key, value in kind.resources.items())


def _at_least(most: int | None, alive: int) -> int | None:
    return None if most is None else max(most, alive)
