"""Two Ray nodes on one machine (ray.cluster_utils.Cluster): one training worker per node."""

from __future__ import annotations

import shutil

import pytest

from attnpipe.config import apply_overrides
from attnpipe.paths import PipelinePaths
from attnpipe.train.launch import train
from tests.train.trace import events

# Real Ray / DVC runs: minutes on an idle 2-core machine; the allowance covers a busy one.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]


def test_two_node_cluster_trains_one_worker_per_node(digits_project, tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    recipe, built = digits_project
    recipe = apply_overrides(recipe, {"train.epochs": 1}, origin="test")
    shutil.copytree(built.root, tmp_path / "project")
    paths = PipelinePaths(tmp_path / "project", "digits")
    trace = tmp_path / "trace"
    monkeypatch.setenv("ATTNPIPE_TRACE_DIR", str(trace))
    monkeypatch.setenv("WANDB_MODE", "disabled")

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        result = train(recipe, paths)  # joins the running cluster
    finally:
        ray.shutdown()
        cluster.shutdown()

    placed = {rank: events(trace, rank)[0]["node_id"] for rank in (0, 1)}
    assert placed[0] != placed[1] and set(placed.values()) == nodes
    assert result.epochs_run == 1 and paths.model_file.is_file()
