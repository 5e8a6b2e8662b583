"""`train.workers: auto` on a cluster with GPUs: one rank per GPU, the plan said, then the
GPU probe refuses, as on any GPU node whose CUDA cannot start.

A real Ray cluster on this machine whose nodes declare logical GPUs (3 in all, on two nodes);
this machine has no GPU, so CUDA cannot start where the ranks would run, which is the refusal
every test here ends in, after the plan was made and said.
"""

from __future__ import annotations

import shutil

import pytest

from attnpipe.cli import main
from attnpipe.paths import PipelinePaths

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def three_gpu_cluster():
    """Head: 1 CPU, no GPU. Node 1: 2 CPUs, 2 logical GPUs. Node 2: 1 CPU, 1 logical GPU."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=2, num_gpus=2)
    cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def project(digits_project, tmp_path_factory) -> PipelinePaths:
    _, built = digits_project
    root = tmp_path_factory.mktemp("gpu-ranks") / "project"
    shutil.copytree(built.root, root)
    return PipelinePaths(root, "digits")


def train_with(project: PipelinePaths, capsys, workers: str) -> tuple[int, list[str], list[str]]:
    code = main(
        [
            "--root",
            str(project.root),
            "train",
            "digits",
            "--set",
            f"train.workers={workers}",
            "--set",
            "tracking.wandb.mode=disabled",
        ]
    )
    said = capsys.readouterr()
    return code, said.out.strip().splitlines(), said.err.strip().splitlines()


def test_auto_plans_one_gpu_rank_per_gpu_and_says_so_before_cuda_refuses(
    three_gpu_cluster, project, capsys
):
    code, out, err = train_with(project, capsys, "auto")
    assert code == 1
    assert any(line.startswith("training run 'digits-") for line in out), out
    assert "(3 worker(s), GPU)" in "\n".join(out)
    assert len(err) == 1, err
    assert "cannot use its GPU" in err[0] and "no NVIDIA driver found" in err[0]
    assert not project.checkpoints.exists()  # no worker ever started


def test_more_ranks_than_gpus_are_refused_and_the_advice_fits(three_gpu_cluster, project, capsys):
    code, out, err = train_with(project, capsys, "4")
    assert code == 1 and len(err) == 1, err
    assert "4 worker(s) of 1 CPU + 1 GPU do not fit on the Ray cluster (local) (3 GPU" in err[0]
    assert "3 fit: " in err[0] and "2 on each of 1 node(s) of 2 CPU, 2 GPU (alive)" in err[0]
    assert "lower train.workers to 3 (or auto), or [1, 3] to run elastic" in err[0]
    assert "gpus_per_worker" not in err[0]  # never a fraction of a GPU per rank
    assert not any("worker(s), GPU)" in line for line in out)  # refused before any plan
    # Each piece of advice fits: the run gets as far as the GPU probe.
    for advised, plan in (("3", "3 worker(s), GPU"), ("[1, 3]", "1-3 worker(s), elastic, GPU")):
        code, out, err = train_with(project, capsys, advised)
        assert code == 1 and f"({plan})" in "\n".join(out), (advised, out, err)
        assert "cannot use its GPU" in err[0], err


def test_a_sweep_of_more_ranks_per_trial_than_gpus_names_the_tune_keys(three_gpu_cluster, project):
    from attnpipe.config import apply_overrides, load_recipe
    from attnpipe.raycluster import ClusterError
    from attnpipe.train.tune import tune

    recipe = apply_overrides(
        load_recipe("digits", project.root),
        {
            "tracking.wandb.mode": "disabled",
            "tune.space": {"train.optimizer.lr": {"type": "choice", "values": [0.001]}},
            "tune.num_samples": 1,
            "tune.workers_per_trial": 4,
        },
        "test",
    )
    with pytest.raises(ClusterError) as refused:
        tune(recipe, project)
    message = str(refused.value)
    assert "4 worker(s) of 1 CPU + 1 GPU do not fit" in message
    assert "lower tune.workers_per_trial to 3, or add GPU nodes" in message  # no auto there
    assert "elastic" not in message and not project.tune_storage.exists()
