"""Ranks that follow the hardware, decided without a cluster: `train.workers` as a number,
`auto` or an elastic [min, max]; refusals whose advice fits; the reader plan at any world size.
"""

from __future__ import annotations

import os

import pytest

from attnpipe.capacity import (
    ClusterCapacity,
    NodeType,
    WorkerPlan,
    _decide,
    check_capacity,
    plan_workers,
)
from attnpipe.config import ConfigError, TrainConfig, parse_recipe
from attnpipe.data.loaders import plan_readers, train_batches
from attnpipe.raycluster import ClusterError
from attnpipe.train.cluster import worker_shape


def plan(train: TrainConfig, use_gpu: bool, capacity: ClusterCapacity) -> int | tuple[int, int]:
    return plan_workers(worker_shape(train), train.workers, use_gpu, capacity, "x")


def fit(train: TrainConfig, workers: int, use_gpu: bool, capacity: ClusterCapacity) -> None:
    check_capacity(worker_shape(train), workers, use_gpu, capacity, "at head:6379")


def decide(train: TrainConfig, capacity: ClusterCapacity, announce=None) -> WorkerPlan:
    return _decide(worker_shape(train), train.workers, capacity, "x", None, announce)


RECIPE = {"source": {"kind": "sklearn-digits"}, "model": {"name": "attention56_cifar"}}


def recipe_error(**train: object) -> str:
    with pytest.raises(ConfigError) as refused:
        parse_recipe({**RECIPE, "train": train}, "digits", origin="pipelines/digits.yaml")
    return str(refused.value)


def test_workers_is_a_number_auto_or_a_range():
    assert TrainConfig(workers=3).workers == 3
    assert TrainConfig(workers="auto").workers == "auto"
    assert TrainConfig(workers=[1, 4]).workers == (1, 4)
    for bad in (0, [2, 1], [0, 2], [1, 2, 3], "all", True, 1.5):
        message = recipe_error(workers=bad)
        assert message.startswith("pipelines/digits.yaml: 'train.workers': ")
        assert "auto" in message and "[min, max]" in message and "\n" not in message


def test_a_fraction_of_a_gpu_is_refused_for_several_ranks_with_advice_that_works():
    message = recipe_error(workers=2, gpus_per_worker=0.5)
    assert "NCCL refuses" in message and "keep train.gpus_per_worker: 1" in message
    # The advice, followed, is a valid recipe; and one rank may take a fraction.
    parse_recipe({**RECIPE, "train": {"workers": "auto", "gpus_per_worker": 1}}, "digits")
    parse_recipe({**RECIPE, "train": {"workers": 1, "gpus_per_worker": 0.5}}, "digits")
    assert "NCCL refuses" in recipe_error(workers="auto", gpus_per_worker=0.25)
    assert "whole GPUs" in recipe_error(workers=1, gpus_per_worker=1.5)


def test_tune_trials_of_several_ranks_take_whole_gpus():
    with pytest.raises(ConfigError) as refused:
        parse_recipe({**RECIPE, "tune": {"workers_per_trial": 2, "gpus_per_worker": 0.5}}, "digits")
    assert "tune.gpus_per_worker: 0.5 would put several DDP ranks on one GPU" in str(refused.value)
    # One rank per trial may share a GPU with other trials.
    parse_recipe({**RECIPE, "tune": {"workers_per_trial": 1, "gpus_per_worker": 0.5}}, "digits")


def test_auto_is_the_whole_ranks_each_node_holds_alive_or_addable():
    alive = ClusterCapacity.fixed({"CPU": 8, "GPU": 3})
    assert plan(TrainConfig(workers="auto"), True, alive) == 3
    scaled = ClusterCapacity(
        (
            NodeType("head", {"CPU": 4}, alive=1, most=1),
            NodeType("gpu", {"CPU": 96, "GPU": 8}, 0, 2),
        ),
        autoscaled=True,
    )
    assert plan(TrainConfig(workers="auto"), True, scaled) == 16
    two_each = TrainConfig(workers="auto", gpus_per_worker=2)
    assert plan(two_each, True, scaled) == 8
    assert plan(TrainConfig(workers=[1, 4]), True, alive) == (1, 4)
    assert plan(TrainConfig(workers=5), True, alive) == 5


def test_auto_without_gpus_is_one_rank_per_node_with_a_workers_cpus():
    # A head that schedules nothing (0 CPUs) and three workers, one too small for 2 CPUs.
    nodes = ClusterCapacity.fixed({"CPU": 0}, {"CPU": 2}, {"CPU": 2}, {"CPU": 1})
    assert plan(TrainConfig(workers="auto"), False, nodes) == 3
    assert plan(TrainConfig(workers="auto", cpus_per_worker=2), False, nodes) == 2
    with pytest.raises(ClusterError, match="auto finds no room for a worker"):
        plan(TrainConfig(workers="auto", cpus_per_worker=4), False, nodes)


def test_more_ranks_than_gpus_are_refused_with_advice_that_fits():
    capacity = ClusterCapacity.fixed({"CPU": 8, "GPU": 3})
    with pytest.raises(ClusterError) as refused:
        fit(TrainConfig(workers=4), 4, True, capacity)
    message = str(refused.value)
    assert message.startswith(
        "4 worker(s) of 1 CPU + 1 GPU do not fit on the Ray cluster at head:6379 (3 GPU on "
        "alive nodes, no autoscaler): 3 fit: 3 on each of 1 node(s) of 8 CPU, 3 GPU (alive)"
    )
    assert "lower train.workers to 3 (or auto), or [1, 3] to run elastic" in message
    assert "gpus_per_worker" not in message  # never a fraction of a GPU per rank
    for advised in (3, "auto", [1, 3]):
        train = TrainConfig(workers=advised)
        fewest = WorkerPlan(plan(train, True, capacity), True).fewest
        fit(train, fewest, True, capacity)  # fits
    with pytest.raises(
        ClusterError,
        match=r"none fits; node\(s\) of 4 CPU, 1 GPU hold none: "
        r"lower train\.gpus_per_worker to 1 to use them; add GPU nodes$",
    ):
        fit(
            TrainConfig(workers=1, gpus_per_worker=2),
            1,
            True,
            ClusterCapacity.fixed({"CPU": 4, "GPU": 1}),
        )


def test_an_elastic_run_needs_room_for_its_minimum_only():
    capacity = ClusterCapacity.fixed({"CPU": 1}, {"CPU": 1})
    plans: list[WorkerPlan] = []
    made = decide(TrainConfig(workers=[2, 8], use_gpu=False), capacity, plans.append)
    assert made == WorkerPlan((2, 8), False) and plans == [made]
    assert made.describe() == "2-8 worker(s), elastic, CPU"
    assert WorkerPlan(3, True).describe() == "3 worker(s), GPU"
    with pytest.raises(ClusterError, match=r"3 worker\(s\) of 1 CPU do not fit .*: 2 fit"):
        decide(TrainConfig(workers=[3, 8], use_gpu=False), capacity)


def test_the_trainer_is_elastic_for_a_range(digits_project):
    from attnpipe.train.launch import build_loop_config, build_trainer

    recipe, paths = digits_project
    loop = build_loop_config(recipe, paths).with_changes(workers=(1, 2))
    scaling = build_trainer(loop, str(paths.checkpoints), 1).scaling_config
    assert scaling.num_workers == (1, 2) and scaling.elasticity_enabled
    fixed = build_trainer(loop.with_changes(workers=None), str(paths.checkpoints), 1)
    assert fixed.scaling_config.num_workers == recipe.train.workers == 2


@pytest.mark.parametrize("workers", [1, 3])
def test_every_world_size_sees_each_sample_at_most_once_per_epoch(workers):
    """What an elastic run relies on: an epoch redone at another world size gets a whole new
    plan of that world size; per epoch each sample is read at most once, and all but fewer than
    a global batch are read."""
    counts = [500, 500, 257]
    for epoch in (2, 3):
        for world in (1, 2, 3, 4):
            plan = plan_readers(counts, world, workers, 32, train=True, seed=0, epoch=epoch)
            seen = [
                (segment.shard, index)
                for reader in plan.readers
                for segment in reader
                for index in range(segment.start, segment.stop)
            ]
            assert len(seen) == len(set(seen))  # at most once
            size, batches = train_batches(sum(counts), world, 32)
            assert len(seen) == world * size * batches > sum(counts) - world * 32


def test_the_gpu_recipes_follow_the_hardware_and_the_demo_keeps_two_cpu_ranks():
    """On 1 GPU or 16 the GPU recipes take every GPU, with the rate following the global batch
    (the source's rate at the source's global batch); the offline demo keeps its 2 CPU ranks."""
    from pathlib import Path

    from attnpipe.config import load_recipe
    from attnpipe.train.schedules import scaled_lr

    root = Path(__file__).resolve().parents[2]
    for name in ("cassava", "melanoma", "aircraft", "imagenet"):
        if not (root / "pipelines" / f"{name}.yaml").is_file():
            assert name == "imagenet", name  # imagenet's recipe may not have landed yet
            continue
        train = load_recipe(name, root).train
        assert train.workers == "auto" and train.optimizer.scale_lr != "none", name
        if name != "imagenet":  # the papers' rates were given for 2 GPUs
            source_batch = 2 * train.batch_size * train.accumulate_steps
            assert scaled_lr(train.optimizer, source_batch) == pytest.approx(train.optimizer.lr)
    assert load_recipe("digits", root).train.workers == 2


def test_an_elastic_run_waits_briefly_for_placement_even_under_an_inherited_long_wait(
    monkeypatch,
):
    """A shrunken elastic run retries its placement after 30 s. The fixed-size runs' 600 s,
    set by an earlier run in this process or inherited from a parent, must not hold it."""
    from attnpipe.train.launch import ELASTIC_START_S, placement_wait

    name = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
    monkeypatch.setenv(name, "600")
    with placement_wait(elastic=True):
        assert os.environ[name] == str(ELASTIC_START_S)
    assert os.environ[name] == "600"  # the next, fixed-size run keeps the long wait
    with placement_wait(elastic=False):
        assert os.environ[name] == "600"
    monkeypatch.delenv(name)
    with placement_wait(elastic=True):
        assert os.environ[name] == str(ELASTIC_START_S)
    assert name not in os.environ
