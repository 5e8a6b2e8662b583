"""The RayJob of cluster/kuberay/rayjob.yaml, run for real on a Ray cluster on this machine.

What KubeRay would do, scaled down: the head's init script puts the image's recipes on the
shared volume (here a temporary folder standing for /mnt/attnpipe, the repository standing
for the image's project folder), a Ray cluster with a CPU-less head and two worker nodes
stands for the head pod and the two GPU pods, and the job's entrypoint runs through a shell
with RAY_ADDRESS set, as Ray's job supervisor runs it. Only what this machine cannot do is
changed, by --set appended to the shipped command: CPUs instead of GPUs, 2 ranks of 1 CPU,
one epoch, no W&B. Everything else (recipe changes, paths, the stages) is the manifest's.

The two training ranks go one to each worker node (one CPU each, the head has none): the run
joins a cluster it did not start and spreads over its nodes, as on the GPU pods.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.cluster.manifests import (
    REPO,
    cluster_spec,
    dockerfile_workdir,
    entrypoint_argv,
    head_init_script,
    load,
    shared_mount,
)
from tests.train.trace import events

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

HERE_ONLY = [
    "train.use_gpu=false",
    "train.workers=2",
    "train.cpus_per_worker=1",
    "train.epochs=1",
    "tracking.wandb.mode=disabled",
]


@pytest.fixture
def local_cluster(monkeypatch, tmp_path):
    """A head without CPUs (like the head pod) and two 1-CPU worker nodes; stopped after.

    The nodes' workers write their trace events to `tmp_path / "trace"` (they read
    ATTNPIPE_TRACE_DIR from the environment their node started with)."""
    import ray._private.utils
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # loopback only
    monkeypatch.setenv("ATTNPIPE_TRACE_DIR", str(tmp_path / "trace"))
    # Cluster() records its address in Ray's shared default temp folder: put back what was
    # there, so that nobody else's `ray.init(address="auto")` finds this cluster.
    address_file = Path(ray._private.utils.get_ray_address_file(None))
    before = address_file.read_text() if address_file.exists() else None
    temp_dir = tempfile.mkdtemp(prefix="rayj", dir="/tmp")  # short: socket paths live here
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": temp_dir},
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if before is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(before)


def _run(command: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["/bin/bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_rayjob_entrypoint_runs_end_to_end(local_cluster, tmp_path):
    job = load("kuberay/rayjob.yaml")
    spec = cluster_spec(job)
    mount, _ = shared_mount(spec)
    shared = tmp_path / "shared"
    shared.mkdir()
    here = {mount: str(shared), dockerfile_workdir(): str(REPO)}

    def local(text: str) -> str:
        for remote, path in here.items():
            text = text.replace(remote, path)
        return text

    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "RAY_ADDRESS": local_cluster.address,
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "DVC_NO_ANALYTICS": "1",
    }
    ids = f"{os.getuid()}:{os.getgid()}"  # the image's ray user is 1000:100
    init = _run(local(head_init_script(spec)).replace("1000:100", ids), env, tmp_path)
    assert init.returncode == 0, init.stderr

    argv = [local(arg) for arg in entrypoint_argv(job)]
    for change in HERE_ONLY:
        argv += ["--set", change]
    done = _run(shlex.join(["attnpipe", *argv]), env, tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    _assert_outputs(shared, output)
    # One rank on each worker node (the head has no CPU for one).
    workers = {node.node_id for node in local_cluster.list_all_nodes()}
    workers.discard(local_cluster.head_node.node_id)
    placed = {rank: events(tmp_path / "trace", rank)[0]["node_id"] for rank in (0, 1)}
    assert placed[0] != placed[1] and set(placed.values()) == workers, (placed, workers)


def _assert_outputs(shared: Path, output: str) -> None:
    project = shared / "project"
    published = shared / "digits" / "shards"
    index = json.loads((published / "index.json").read_text())
    names = [e["name"] for block in index["splits"].values() for e in block["shards"]]
    assert len(index["splits"]["train"]["shards"]) == 16  # shard.min_shards=16 of the job
    assert all((published / name).stat().st_size > 0 for name in names)
    assert f"to {published}" in output
    assert "training run 'digits-" in output and "(2 worker(s), CPU)" in output
    runs = [p for p in (shared / "checkpoints").iterdir() if p.name.startswith("digits-")]
    assert runs, "no Ray Train run under train.storage_path"
    assert (project / "models/digits/model.pt").stat().st_size > 0
    assert (project / "models/digits/model.onnx").stat().st_size > 0
    test = json.loads((project / "reports/digits/metrics.json").read_text())["test"]
    assert 0.0 <= test["accuracy"] <= 1.0 and test["test_samples"] > 0
