"""`evaluate --address`: Ray workers on a real 2-node cluster on this machine (no GPU here: the
workers score on CPUs; the device decision is training's, tested in tests/train/test_devices.py).
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from attnpipe.cli import main
from attnpipe.config import apply_overrides
from attnpipe.data.loaders import split_info
from attnpipe.evaluate.run import EXAMPLES_PER_CLASS, run_split
from attnpipe.modelfile import load_model_file

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def test_a_two_worker_cluster_scores_each_test_sample_once_as_one_process_does(
    trained_project, capsys, tmp_path
):
    """Two nodes of one CPU each; `evaluate.workers: auto` on a GPU-less cluster is one worker
    per node, each reading its share with 2 loader workers. The merged result is the one
    process's: the same ids once each, predictions, probabilities, counts and examples. Then
    the command docs/cluster.md shows, `attnpipe evaluate digits --address ...`, writes the same
    metrics and one confusion row per test sample."""
    import ray
    from ray.cluster_utils import Cluster

    recipe, paths = trained_project
    model, payload = load_model_file(paths.model_file)
    local = run_split(model, payload, recipe, paths, "test", EXAMPLES_PER_CLASS)
    on_cluster = apply_overrides(
        recipe,
        {"evaluate.device": "cpu", "evaluate.cpus_per_worker": 1, "train.loader_workers": 2},
        "test",
    )
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        remote = run_split(
            model, payload, on_cluster, paths, "test", EXAMPLES_PER_CLASS, cluster.address
        )
        root = tmp_path / "project"
        shutil.copytree(paths.root, root, symlinks=True)
        command = ["--root", str(root), "evaluate", "digits", "--address", cluster.address]
        assert main([*command, "--set", "evaluate.device=cpu", "--set", "evaluate.workers=2"]) == 0
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert "evaluating on 2 Ray worker(s), CPU" in capsys.readouterr().out
    samples = split_info(paths.shards, "test").samples
    assert len(remote.shares) == 2 and min(remote.shares) > 0 and sum(remote.shares) == samples
    assert remote.ids == local.ids and len(set(remote.ids)) == samples
    np.testing.assert_array_equal(remote.labels, local.labels)
    np.testing.assert_array_equal(remote.predicted, local.predicted)
    np.testing.assert_allclose(remote.confidence, local.confidence, atol=1e-5)
    np.testing.assert_allclose(remote.true_prob, local.true_prob, atol=1e-5)
    np.testing.assert_array_equal(remote.counts.matrix, local.counts.matrix)
    assert remote.counts.metrics() == pytest.approx(local.counts.metrics(), abs=1e-6)
    examples = [(c.sample_id, c.predicted) for c in remote.candidates]
    assert examples == [(c.sample_id, c.predicted) for c in local.candidates]
    assert local.wrong_examples and local.correct_examples
    written = json.loads((root / "reports" / "digits" / "metrics.json").read_text())["test"]
    assert written["test_samples"] == samples
    assert written["accuracy"] == pytest.approx(local.counts.metrics()["accuracy"], abs=1e-9)
    with (root / "reports" / "digits" / "confusion.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == samples
    assert (root / "reports" / "digits" / "index.html").exists()
