"""Plans Ray can place: a worker is a bundle that must fit on one node, so `workers: auto`,
the capacity check, `attnpipe plan` and evaluation's `auto` count whole workers per node,
alive nodes first, then the autoscaler's node types within their limits; never sums.

No Ray: the clusters are cluster/aws.yaml as `ray up` would start it, and capacities built
by hand as a live cluster reports them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from attnpipe.capacity import (
    ClusterCapacity,
    NodeType,
    WorkerShape,
    auto_workers,
    check_capacity,
    decide_plan,
    node_start_wait_s,
)
from attnpipe.cli import main
from attnpipe.config import TrainConfig, apply_overrides, load_recipe
from attnpipe.placement import capacity_from_file, group_alive_nodes, pack, placed
from attnpipe.raycluster import ClusterError
from attnpipe.train.cluster import worker_shape

REPO = Path(__file__).resolve().parents[1]
AWS = REPO / "cluster" / "aws.yaml"


def plan_lines(capsys, *changes: str) -> tuple[int, list[str], list[str]]:
    argv = ["--root", str(REPO), "plan", "imagenet", "--cluster", str(AWS)]
    for change in changes:
        argv += ["--set", change]
    code = main(argv)
    said = capsys.readouterr()
    return code, said.out.strip().splitlines(), said.err.strip().splitlines()


def ranks_by_hand(cpus_per_worker: float) -> int:
    """What cluster/aws.yaml holds, read independently: per GPU type, min(its CPUs // a
    rank's, its GPUs) ranks per node, times its max_workers; within the file's max_workers."""
    config = yaml.safe_load(AWS.read_text())
    nodes_left, ranks = config["max_workers"], 0
    types = config["available_node_types"].values()
    per_node = [
        (min(int(t["resources"]["CPU"] // cpus_per_worker), int(t["resources"].get("GPU", 0))), t)
        for t in types
    ]
    for holds, node_type in sorted(per_node, key=lambda pair: -pair[0]):
        nodes = min(node_type.get("max_workers", 0), nodes_left) if holds else 0
        ranks, nodes_left = ranks + holds * nodes, nodes_left - nodes
    return ranks


def test_imagenet_on_aws_is_two_8_gpu_nodes_not_the_1_gpu_nodes_a_10_cpu_rank_never_fits(capsys):
    code, out, _ = plan_lines(capsys)
    text = "\n".join(out)
    assert code == 0 and ranks_by_hand(10) == 16
    assert out[0] == (
        f"imagenet on the Ray cluster in {AWS}: 16 worker(s), GPU, each 10 CPU + 1 GPU"
    )
    assert out[1] == "  8 on each of 2 gpu_8x_a100 node(s) (added)"
    assert (
        "gpu_1x, gpu_1x_spot node(s) (4 CPU, 1 GPU) hold none: lower train.cpus_per_worker "
        "to 4 to use them" in text
    )
    # Global batch: 16 ranks x 32 images; lr 0.1 at 256 scaled linearly to 512.
    assert "global batch at 16 rank(s): 512 = 16 x 32 (train.batch_size) x 1" in text
    assert "learning rate 0.2 (0.1 at batch 256, scale_lr: linear)" in text
    assert "loader processes: 8 per rank (train.loader_workers), 128 in all" in text


def test_ranks_of_4_cpus_fill_the_1_gpu_nodes_too(capsys):
    code, out, _ = plan_lines(capsys, "train.cpus_per_worker=4")
    text = "\n".join(out)
    assert code == 0 and ranks_by_hand(4) == 20
    assert "20 worker(s), GPU, each 4 CPU + 1 GPU" in text
    for placed_on in ("8 on each of 2 gpu_8x_a100", "1 on each of 2 gpu_1x ", "2 gpu_1x_spot"):
        assert placed_on in text
    assert "global batch at 20 rank(s): 640" in text and "learning rate 0.25 " in text


def test_a_plan_that_cannot_be_placed_is_refused_naming_what_fits(capsys):
    code, out, err = plan_lines(capsys, "train.workers=20")
    assert code == 1 and len(err) == 1, err
    message = err[0]
    assert "20 worker(s) of 10 CPU + 1 GPU do not fit on the Ray cluster in" in message
    assert "16 fit: 8 on each of 2 gpu_8x_a100 node(s) (added)" in message
    assert "gpu_1x, gpu_1x_spot node(s) (4 CPU, 1 GPU) hold none: lower " in message
    assert "lower train.workers to 16 (or auto), or [1, 16] to run elastic" in message
    assert not any("global batch" in line for line in out)
    # Each piece of advice, followed, is a plan.
    for advice in (["train.workers=16"], ["train.workers=[1,16]"], ["train.cpus_per_worker=4"]):
        code, out, err = plan_lines(capsys, "train.workers=20", *advice)
        assert code == 0, (advice, err)


def test_an_elastic_plan_gives_the_batch_and_rate_at_its_fewest_and_most_ranks(capsys):
    code, out, _ = plan_lines(capsys, "train.workers=[4,20]")
    text = "\n".join(out)
    assert code == 0 and "4-20 worker(s), elastic, GPU" in text
    assert "(the elastic maximum, 20, does not fit: 16 at most)" in text
    assert "global batch at 4 rank(s): 128" in text and "learning rate 0.05 " in text
    assert "global batch at 16 rank(s): 512" in text and "learning rate 0.2 " in text


def test_the_sums_fit_but_the_nodes_do_not():
    """16 ranks of 14 CPUs: 2 x 96 + 32 CPUs and 20 GPUs are enough in sum; per node, 6 + 6
    + 2 ranks. Before, they "fit" and then waited out the start timeout."""
    capacity = ClusterCapacity.fixed(
        {"CPU": 96, "GPU": 8}, {"CPU": 96, "GPU": 8}, {"CPU": 32, "GPU": 4}
    )
    shape = worker_shape(TrainConfig(workers=16, cpus_per_worker=14))
    with pytest.raises(ClusterError) as refused:
        check_capacity(shape, 16, True, capacity, "at head:6379")
    message = str(refused.value)
    assert "14 fit: 6 on each of 2 node(s) of 96 CPU, 8 GPU (alive)" in message
    assert "node(s) of 96 CPU, 8 GPU hold 6 each: lower train.cpus_per_worker to 12 " in message
    assert auto_workers(shape, True, capacity) == 14
    assert placed(check_capacity(shape, 14, True, capacity, "x")) == 14


def test_alive_nodes_first_then_the_smallest_node_type_that_finishes_the_rest():
    gpu_1x = NodeType("gpu_1x", {"CPU": 4, "GPU": 1}, alive=0, most=2)
    capacity = ClusterCapacity(
        (
            NodeType("gpu_8x", {"CPU": 96, "GPU": 8}, alive=1, most=2),
            NodeType("gpu_8x_idle", {"CPU": 96, "GPU": 8}, alive=0, most=0),
            gpu_1x,
        ),
        autoscaled=True,
        max_added=2,
    )
    bundle = {"CPU": 4, "GPU": 1}
    described = [share.describe() for share in pack(bundle, capacity, 9)]
    assert described == [
        "8 on each of 1 gpu_8x node(s) (alive)",
        "1 on each of 1 gpu_1x node(s) (added)",
    ]
    # max_added: 2 more nodes at most, one gpu_8x (its max_workers) and one gpu_1x.
    assert placed(pack(bundle, capacity, 18)) == placed(pack(bundle, capacity, None)) == 17
    assert capacity.most("GPU") == 17 and capacity.alive_only().most("GPU") == 8
    unlimited = ClusterCapacity((NodeType("any", {"CPU": 4, "GPU": 1}, 0, None),), True)
    with pytest.raises(ClusterError, match="has no max_workers, nor the cluster"):
        pack(bundle, unlimited, None)
    assert placed(pack(bundle, unlimited, 5)) == 5


def test_a_live_clusters_alive_nodes_join_their_node_types():
    declared = [
        NodeType("gpu_8x", {"CPU": 96, "GPU": 8}, most=2),
        NodeType("gpu_1x", {"CPU": 4, "GPU": 1}, most=2),
    ]
    nodes = [
        {"Resources": {"CPU": 8, "node:__internal_head__": 1, "memory": 9e9}, "Labels": {}},
        # Labelled by the autoscaler (v2, KubeRay), or recognised by its declared resources.
        {"Resources": {"CPU": 96, "GPU": 8}, "Labels": {"ray.io/node-group": "gpu_8x"}},
        {"Resources": {"CPU": 4, "GPU": 1, "node:10.0.0.7": 1, "object_store_memory": 1e9}},
        {"Resources": {"CPU": 8, "memory": 8e9}, "Labels": {}},
    ]
    types = group_alive_nodes(nodes, declared)
    assert [(kind.name, kind.alive, kind.most) for kind in types] == [
        ("gpu_8x", 1, 2),
        ("gpu_1x", 1, 2),
        ("", 2, 2),  # the head and a node alike but for memory: the smaller memory kept
    ]
    assert types[2].resources == {"CPU": 8, "memory": 8e9}
    assert types[2].label == "node(s) of 8 CPU, 0 GPU"


def test_evaluation_auto_takes_the_alive_gpus_never_the_autoscalers_maximum():
    from attnpipe.evaluate.cluster import evaluation_shape, evaluation_workers

    recipe = load_recipe("imagenet", REPO)
    shape = evaluation_shape(recipe)
    one_alive = ClusterCapacity(
        (
            NodeType("head", {"CPU": 8}, alive=1, most=1),
            NodeType("gpu_8x", {"CPU": 96, "GPU": 8}, alive=1, most=2),
        ),
        autoscaled=True,
    )
    assert auto_workers(worker_shape(recipe.train), True, one_alive) == 16  # training's auto
    assert evaluation_workers(recipe, shape, one_alive, "x") == 8
    none_alive = ClusterCapacity(
        (NodeType("gpu_8x", {"CPU": 96, "GPU": 8}, alive=0, most=2),), autoscaled=True
    )
    assert evaluation_workers(recipe, shape, none_alive, "x") == 1  # train.workers: auto
    for trained, expected in ((12, 12), ((2, 16), 2)):
        changed = apply_overrides(recipe, {"train.workers": trained}, "test")
        assert evaluation_workers(changed, shape, none_alive, "x") == expected
    fixed = apply_overrides(recipe, {"evaluate.workers": 3}, "test")
    assert evaluation_workers(fixed, shape, none_alive, "x") == 3


def test_the_decision_is_the_runs_own_and_refuses_a_use_gpu_it_cannot_honour():
    capacity = capacity_from_file(AWS)
    shape = WorkerShape(use_gpu=True, cpus_per_worker=10, gpus_per_worker=1)
    plan = decide_plan(shape, "auto", capacity, "x")
    assert plan.workers == 16 and plan.use_gpu and placed(plan.shares) == 16
    cpus_only = ClusterCapacity.fixed({"CPU": 8})
    with pytest.raises(ClusterError, match=r"train.use_gpu is true but .* has no GPUs"):
        decide_plan(shape, "auto", cpus_only, "x")


def test_cluster_files_that_cannot_be_planned_say_why(tmp_path):
    kuberay = REPO / "cluster" / "kuberay" / "raycluster.yaml"
    with pytest.raises(ClusterError, match="is a KubeRay RayCluster: plan against the running"):
        capacity_from_file(kuberay)
    bare = tmp_path / "bare.yaml"
    bare.write_text("max_workers: 2\navailable_node_types:\n  gpu: {max_workers: 2}\n")
    with pytest.raises(ClusterError, match="node type gpu declares no resources: add resources"):
        capacity_from_file(bare)
    with pytest.raises(ClusterError, match="no cluster file"):
        capacity_from_file(tmp_path / "missing.yaml")


def test_the_gpu_probe_of_an_elastic_run_waits_as_long_as_a_fixed_size_run(
    digits_project, monkeypatch
):
    """An autoscaled GPU node boots in minutes; the probe (inside `training_cluster`) must not
    inherit the elastic run's 30 s placement wait, which is set after it."""
    from contextlib import contextmanager

    from attnpipe.train import launch

    waits: list[float] = []

    @contextmanager
    def cluster(*args, **kwargs):
        waits.append(node_start_wait_s())
        raise KeyboardInterrupt("stop before Ray")
        yield

    recipe, paths = digits_project
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    monkeypatch.setattr(launch, "training_cluster", cluster)
    elastic = apply_overrides(recipe, {"train.workers": [1, 2]}, "test")
    with pytest.raises(KeyboardInterrupt):
        launch.train(elastic, paths)
    assert waits == [600.0]
    assert os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "600"


def test_plan_help_says_what_it_reads_and_that_it_starts_nothing(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("--cluster", "--address", "--set", "--overrides", "without starting"):
        assert fragment in text
    assert "global batch" in text and "cluster/aws.yaml" in text
