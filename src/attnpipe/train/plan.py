"""What a training run would start, decided without starting anything (`attnpipe plan`).

The decision is the run's own, `attnpipe.capacity.decide_plan` (which `train` makes before its
GPU probe), on the cluster a `ray up` file describes, a live cluster or this machine; the
numbers that follow from it are the training loop's own (`schedules.global_batch_size`,
`scaled_lr`). So a plan and the run it describes never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnpipe.capacity import ClusterCapacity, WorkerPlan, decide_plan, node_notes
from attnpipe.config import Recipe
from attnpipe.placement import placed
from attnpipe.train.cluster import worker_resources, worker_shape
from attnpipe.train.schedules import global_batch_size, scaled_lr


@dataclass(frozen=True)
class TrainingPlan:
    """A run's ranks and where they go, and what follows from their number."""

    recipe: Recipe
    where: str  # e.g. "in cluster/aws.yaml", "at head:6379", "(local)"
    workers: WorkerPlan
    notes: tuple[str, ...]  # node types that hold fewer ranks than their GPUs would

    @property
    def world_sizes(self) -> tuple[int, ...]:
        """The world sizes the run trains at: one, or an elastic run's fewest and most that
        fit (it grows up to its maximum as far as the nodes hold it)."""
        most = min(self.workers.most, placed(self.workers.shares))
        return (
            (self.workers.fewest,) if most <= self.workers.fewest else (self.workers.fewest, most)
        )


def plan_training(recipe: Recipe, capacity: ClusterCapacity, where: str) -> TrainingPlan:
    """The ranks `train` would start on `capacity`; raises ClusterError as the run would
    (nothing fits, a use_gpu the cluster cannot honour), naming what fits."""
    shape = worker_shape(recipe.train)
    workers = decide_plan(shape, recipe.train.workers, capacity, where)
    notes = node_notes(shape, worker_resources(recipe.train, workers.use_gpu), capacity)
    return TrainingPlan(recipe, where, workers, tuple(notes))


def describe_training_plan(plan: TrainingPlan) -> str:
    """The plan in a few lines: ranks, where they go, global batch, learning rate, loaders."""
    train, workers = plan.recipe.train, plan.workers
    bundle = worker_resources(train, workers.use_gpu)
    each = " + ".join(f"{value:g} {key}" for key, value in bundle.items() if value > 0)
    lines = [
        f"{plan.recipe.name} on the Ray cluster {plan.where}: {workers.describe()}, each {each}"
    ]
    lines += [f"  {share.describe()}" for share in workers.shares]
    if workers.most > (fits := placed(workers.shares)):
        lines.append(f"  (the elastic maximum, {workers.most}, does not fit: {fits} at most)")
    lines += [f"  {note}" for note in plan.notes]
    optimizer = train.optimizer
    for world in plan.world_sizes:
        batch = global_batch_size(train, world)
        lines.append(
            f"global batch at {world} rank(s): {batch} = {world} x {train.batch_size} "
            f"(train.batch_size) x {train.accumulate_steps} (train.accumulate_steps); learning "
            f"rate {scaled_lr(optimizer, batch):g} ({optimizer.lr:g} at batch "
            f"{optimizer.reference_batch}, scale_lr: {optimizer.scale_lr})"
        )
    loaders = train.loader_workers
    lines.append(
        f"loader processes: {loaders} per rank (train.loader_workers), "
        f"{loaders * max(plan.world_sizes)} in all; each rank's {train.cpus_per_worker:g} "
        "CPU(s) (train.cpus_per_worker) run them and the rank itself"
    )
    return "\n".join(lines)
