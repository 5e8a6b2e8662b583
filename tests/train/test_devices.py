"""Devices are decided where the work runs: by the Ray cluster, never by the driver's CUDA.

A real Ray cluster on this machine whose head declares no GPU and whose second node declares
one logical GPU (`num_gpus=1`): Ray schedules GPU work there, and CUDA cannot start there
(no driver on this machine), which is exactly a GPU node with a missing or too old driver.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from attnpipe.capacity import (
    ClusterCapacity,
    NodeType,
    auto_workers,
    check_capacity,
    cluster_capacity,
    resolve_use_gpu,
)
from attnpipe.cli import main
from attnpipe.config import TrainConfig, apply_overrides
from attnpipe.devices import DeviceError, cuda_status, explain, require_cuda, required_driver
from attnpipe.paths import PipelinePaths
from attnpipe.raycluster import ClusterError
from attnpipe.train.cluster import worker_shape

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]


def test_gpu_less_cluster_with_use_gpu_true_is_one_line_before_any_worker(
    digits_project, tmp_path, capsys, monkeypatch
):
    """A private local cluster on this GPU-less machine: `use_gpu: true` cannot be honoured.

    First in the module: the GPU-node cluster of the tests below is not started yet.
    """
    import ray

    assert not ray.is_initialized()
    _, paths = _project(digits_project, tmp_path / "project")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(["--root", str(paths.root), "train", "digits", "--set", "train.use_gpu=true"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1, lines
    assert "train.use_gpu is true but the Ray cluster (local) has no GPUs" in lines[0]
    assert not paths.checkpoints.exists()


@pytest.fixture(scope="module")
def gpu_node_cluster():
    """Head: 1 CPU, no GPU. Worker node: 1 CPU, 1 logical GPU."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _project(digits_project, root: Path) -> tuple:
    recipe, built = digits_project
    shutil.copytree(built.root, root)
    return recipe, PipelinePaths(root, "digits")


def test_auto_asks_the_cluster_and_a_gpu_without_driver_stops_the_run(
    gpu_node_cluster, digits_project, tmp_path
):
    """train: `auto` resolves to GPUs (they are on the worker node, not the driver's machine);
    the first GPU task finds no usable driver and the run stops with what to do, before any
    training worker starts. Before, this trained on CPU without a word."""
    from attnpipe.train.launch import train

    recipe, paths = _project(digits_project, tmp_path / "project")
    recipe = apply_overrides(
        recipe, {"train.workers": 1, "tracking.wandb.mode": "disabled"}, "test"
    )
    assert recipe.train.use_gpu == "auto"
    with pytest.raises(ClusterError) as failed:
        train(recipe, paths)
    message = str(failed.value)
    assert "cannot use its GPU" in message and "no NVIDIA driver found" in message
    assert f"NVIDIA driver >= {required_driver()}" in message and "\n" not in message
    assert not paths.checkpoints.exists()  # no worker ever started


def test_tune_trials_get_the_same_devices(gpu_node_cluster, digits_project, tmp_path):
    from attnpipe.train.tune import tune

    recipe, paths = _project(digits_project, tmp_path / "project")
    recipe = apply_overrides(
        recipe,
        {
            "tracking.wandb.mode": "disabled",
            "tune.space": {"train.optimizer.lr": {"type": "choice", "values": [0.001]}},
            "tune.num_samples": 1,
        },
        "test",
    )
    with pytest.raises(ClusterError, match=r"cannot use its GPU.*no NVIDIA driver found"):
        tune(recipe, paths)
    assert not paths.tune_storage.exists()


def test_evaluate_on_the_cluster_plans_a_worker_per_gpu_and_stops_where_cuda_cannot_start(
    gpu_node_cluster, digits_project, tmp_path, capsys
):
    """`evaluate --address` makes training's device decision (attnpipe.capacity): auto workers
    are one per GPU of the cluster, GPUs because the worker node has one, and the probe placed
    like a worker stops the run with the CUDA message before any scoring."""
    from attnpipe.evaluate.run import evaluate
    from attnpipe.modelfile import Provenance, write_model_file
    from attnpipe.models import create_model

    recipe, paths = _project(digits_project, tmp_path / "project")
    recipe = apply_overrides(recipe, {"tracking.wandb.mode": "disabled"}, "test")
    names = [str(i) for i in range(10)]
    model = create_model(recipe.model.name, 10, **recipe.model.kwargs)
    write_model_file(
        paths.model_file, recipe, model.state_dict(), names, Provenance(1, {}, "", "", "")
    )
    assert recipe.evaluate.workers == "auto" and recipe.evaluate.device == "auto"
    with pytest.raises(ClusterError) as failed:
        evaluate(recipe, paths, address=gpu_node_cluster.address)
    assert "evaluating on 1 Ray worker(s), GPU" in capsys.readouterr().out
    message = str(failed.value)
    assert "cannot use its GPU" in message and "no NVIDIA driver found" in message
    assert not paths.metrics.exists()
    # Before the next test tells the cluster about autoscaler node types with 16 GPUs.
    with pytest.raises(ClusterError, match=r"2 worker\(s\) of .* 1 fit: .* lower evaluate.workers"):
        evaluate(
            apply_overrides(recipe, {"evaluate.workers": 2}, "test"),
            paths,
            address=gpu_node_cluster.address,
        )


def test_capacity_counts_alive_nodes_and_the_autoscalers_node_types(gpu_node_cluster):
    import ray
    from ray.core.generated import autoscaler_pb2

    capacity = cluster_capacity()
    assert capacity.alive["GPU"] == 1 and capacity.alive["CPU"] == 2 and not capacity.autoscaled
    config = autoscaler_pb2.ClusterConfig(
        node_group_configs=[
            autoscaler_pb2.NodeGroupConfig(
                name="gpu_8x", resources={"CPU": 96, "GPU": 8}, max_count=2
            )
        ]
    )
    # What a cluster launcher's autoscaler reports: GPU nodes that are not started yet.
    ray._private.worker.global_worker.gcs_client.report_cluster_config(config.SerializeToString())
    scaled = cluster_capacity()
    # The alive GPU node is of no declared type: a node beside the 2 the autoscaler may add.
    assert scaled.autoscaled and scaled.most("GPU") == 17
    assert NodeType("gpu_8x", {"CPU": 96, "GPU": 8}, alive=0, most=2) in scaled.node_types
    assert auto_workers(worker_shape(TrainConfig(workers="auto")), True, scaled) == 17


def test_plan_on_a_live_cluster_uses_its_alive_nodes_first(
    gpu_node_cluster, digits_project, capsys
):
    """After the test above: the cluster has one alive 1-GPU node and an autoscaler that may
    add 2 x 8 GPUs. `attnpipe plan --address` reads both and starts nothing."""
    _, built = digits_project
    argv = ["--root", str(built.root), "plan", "digits", "--address", gpu_node_cluster.address]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "digits on the Ray cluster at " in out and "2 worker(s), GPU, each 1 CPU + 1 GPU" in out
    assert "1 on each of 1 node(s) of 1 CPU, 1 GPU (alive)" in out
    assert "1 on 1 gpu_8x node(s) (added, 8 each at most)" in out
    assert "global batch at 2 rank(s): " in out


def test_the_decisions_by_hand():
    none = ClusterCapacity.fixed({"CPU": 8})
    later = ClusterCapacity(
        (NodeType("head", {"CPU": 4}, 1, 1), NodeType("gpu", {"CPU": 96, "GPU": 8}, 0, 1)),
        autoscaled=True,
    )

    def shape(**settings):
        return worker_shape(TrainConfig(**settings))

    assert resolve_use_gpu(shape(use_gpu="auto"), none, "x") is False
    assert resolve_use_gpu(shape(use_gpu="auto"), later, "x") is True
    assert resolve_use_gpu(shape(use_gpu=False), later, "x") is False
    with pytest.raises(ClusterError, match=r"train.use_gpu is true but .* has no GPUs"):
        resolve_use_gpu(shape(use_gpu=True), none, "x")
    with pytest.raises(ClusterError, match=r"none fits; add GPU nodes, or set train.use_gpu"):
        check_capacity(shape(gpus_per_worker=1), 16, True, ClusterCapacity.fixed({"CPU": 64}), "x")
    check_capacity(shape(cpus_per_worker=4), 2, True, later, "x")


def test_driver_messages_say_what_was_found_what_is_needed_and_what_to_do():
    needed = required_driver("13.0")
    assert needed == "580.65.06"
    too_old = explain("535.104.05", "13.0")
    assert "NVIDIA driver 535.104.05 is too old for CUDA 13.0" in too_old
    assert f">= {needed}" in too_old and "train.use_gpu: false" in too_old
    assert "no NVIDIA driver found" in explain(None, "13.0")
    status = cuda_status(driver="535.104.05")
    assert not status.usable and "too old" in status.problem
    with pytest.raises(DeviceError, match="training worker 0 was given a GPU: no NVIDIA driver"):
        require_cuda("training worker 0 was given a GPU")


def test_torchrun_on_a_machine_with_a_gpu_cuda_cannot_use_fails_instead_of_using_the_cpu(
    monkeypatch, tmp_path
):
    """`auto` counts GPUs through the driver, as Ray does, not through CUDA: a GPU whose CUDA
    cannot start is wanted, and then refused with the reason (before: a silent CPU run)."""
    from attnpipe import devices
    from attnpipe.train.session import TorchrunSession

    assert devices.wants_gpu("auto") is (devices.nvidia_gpus() > 0)
    assert devices.wants_gpu(False) is False and devices.wants_gpu(True) is True
    monkeypatch.setattr(devices, "nvidia_gpus", lambda: 1)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match=r"torchrun rank 0: no NVIDIA driver found"):
            TorchrunSession(tmp_path, use_gpu="auto")
    assert TorchrunSession(tmp_path, use_gpu=False).device.type == "cpu"
