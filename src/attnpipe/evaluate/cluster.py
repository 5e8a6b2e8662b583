"""`evaluate --address`: the split scored by Ray workers on the cluster's GPUs.

Devices are decided as training decides them (`attnpipe.capacity`: GPUs the cluster has or
its autoscaler can add, whether the workers fit on its nodes, whether CUDA starts where they
run); `evaluate.workers: auto` counts the alive nodes only. Each
worker scores its share of the shards (the evaluation reader plan: every sample exactly
once over all workers) with the recipe's loader workers, AMP and memory format, and sends
back only counts and a few numbers per sample; the driver never holds an image or a
probability matrix. The model file travels once through Ray's object store, so the workers
need no access to the driver's disk (the shards must be where they can read them: a shared
folder or `shard.publish_to`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from attnpipe.capacity import (
    ClusterCapacity,
    WorkerShape,
    auto_workers,
    cluster_capacity,
    decide_devices,
    resolve_use_gpu,
    worker_resources,
)
from attnpipe.config import Recipe
from attnpipe.data.shard_index import ShardEntry
from attnpipe.devices import require_cuda
from attnpipe.evaluate.scoring import SplitResult, score_share
from attnpipe.modelfile import load_model_file
from attnpipe.raycluster import configure_ray_environment, connect_ray

USE_GPU = {"auto": "auto", "cpu": False, "cuda": True}


def evaluation_shape(recipe: Recipe) -> WorkerShape:
    """What each evaluation worker asks for: `evaluate.cpus_per_worker` / `gpus_per_worker`
    (default: training's), GPUs as `evaluate.device` says."""
    evaluate, train = recipe.evaluate, recipe.train
    return WorkerShape(
        use_gpu=USE_GPU[evaluate.device],
        cpus_per_worker=evaluate.cpus_per_worker or train.cpus_per_worker,
        gpus_per_worker=(
            train.gpus_per_worker if evaluate.gpus_per_worker is None else evaluate.gpus_per_worker
        ),
        section="evaluate",
        device_key="evaluate.device",
        device_gpu="cuda",
        device_others="auto or cpu",
    )


def evaluation_workers(
    recipe: Recipe, shape: WorkerShape, capacity: ClusterCapacity, where: str
) -> int:
    """`evaluate.workers`; auto: the workers the alive nodes hold (`capacity.auto_workers` on
    them), never the autoscaler's maximum: scoring a test split is no reason to start a fleet.
    With no alive node that holds one (the GPU nodes went idle after training), as many as
    training's ranks when they were a number (an elastic run's minimum), else one."""
    if recipe.evaluate.workers != "auto":
        return recipe.evaluate.workers
    use_gpu = resolve_use_gpu(shape, capacity, where)
    alive = auto_workers(shape, use_gpu, capacity.alive_only())
    if alive > 0:
        return alive
    trained = recipe.train.workers
    if isinstance(trained, tuple):
        return trained[0]
    return trained if isinstance(trained, int) else 1


def score_on_cluster(
    model_file: Path,
    recipe: Recipe,
    shards: Sequence[ShardEntry],
    class_names: list[str],
    input_size: int,
    examples_per_class: int,
    address: str | None,
) -> SplitResult:
    """Every sample of the split scored once by the cluster's workers, merged in order."""
    configure_ray_environment()
    import ray

    shape = evaluation_shape(recipe)
    started_here = connect_ray(address)
    try:
        where = f"at {address}" if address else "(local)"
        capacity = cluster_capacity()
        workers = evaluation_workers(recipe, shape, capacity, where)
        # The plan first, so that a refusal (no fit, a GPU CUDA cannot use) follows it.
        planned_gpu = resolve_use_gpu(shape, capacity, where)
        print(f"evaluating on {workers} Ray worker(s), {'GPU' if planned_gpu else 'CPU'}")
        use_gpu = decide_devices(shape, workers, address)
        resources = worker_resources(shape, use_gpu)
        task = ray.remote(_score_worker).options(
            num_cpus=resources["CPU"], num_gpus=resources.get("GPU", 0), max_retries=1
        )
        model_ref = ray.put(model_file.read_bytes())
        pending = [
            task.remote(
                model_ref,
                recipe,
                list(shards),
                class_names,
                input_size,
                examples_per_class,
                rank,
                workers,
                use_gpu,
            )
            for rank in range(workers)
        ]
        return SplitResult.merge(ray.get(pending))
    finally:
        if started_here:
            ray.shutdown()


def _score_worker(
    model_bytes: bytes,
    recipe: Recipe,
    shards: list[ShardEntry],
    class_names: list[str],
    input_size: int,
    examples_per_class: int,
    rank: int,
    world_size: int,
    use_gpu: bool,
) -> SplitResult:
    """One Ray worker: its share of the split, on the GPU Ray gave it (or the CPU)."""
    device = (
        require_cuda(f"evaluation worker {rank} was given a GPU")
        if use_gpu
        else torch.device("cpu")
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pt"
        path.write_bytes(model_bytes)
        model, _ = load_model_file(path)
    return score_share(
        model,
        recipe,
        shards,
        class_names,
        input_size,
        device=device,
        rank=rank,
        world_size=world_size,
        examples_per_class=examples_per_class,
    )
