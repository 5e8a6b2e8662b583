"""prepare and shard as Ray tasks on a two-node cluster write a local run's files, byte for byte.

The raw folder includes unusable files (missing, empty, not an image, truncated), so the
rejection reasons are compared too. Tasks read their images from the shared project folder
themselves (the nodes of `ray.cluster_utils.Cluster` share this machine's disk, as NFS would)
and `shard`'s tasks write their tars there; the bytes the driver sends to and receives from
tasks are counted where tasks are submitted and collected (the trace records them).
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from attnpipe.cli import main
from attnpipe.paths import PipelinePaths
from tests.conftest import S3Bucket, make_s3_bucket


def on_ray(test):
    """Real Ray runs: a minute on an idle 2-core machine; the allowance covers a busy one."""
    return pytest.mark.ray(pytest.mark.timeout(1200)(test))


OUTPUTS = ("manifest.parquet", "rejected.csv", "classes.json")


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _trace(folder: Path, kind: str) -> list[dict]:
    path = folder / f"{kind}-tasks.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@contextmanager
def _two_node_cluster() -> Iterator[tuple[str, set[str]]]:
    """A head and one more node, one CPU each: (address, node ids). The nodes' processes
    inherit this process's environment as it is when they start."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster.address, {node.node_id for node in cluster.list_all_nodes()}
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def module_bucket(moto_endpoint: str) -> Iterator[S3Bucket]:
    """A bucket for the module, its AWS_* set before the cluster starts: the nodes get the
    S3 test server's credentials and endpoint, as real nodes have theirs."""
    with pytest.MonkeyPatch.context() as patch:
        yield make_s3_bucket(moto_endpoint, patch)


@pytest.fixture(scope="module")
def two_nodes(module_bucket: S3Bucket) -> Iterator[tuple[str, set[str]]]:
    """One cluster for the module: every test connects and disconnects as a command would."""
    with _two_node_cluster() as cluster:
        yield cluster


def _damage(raw: Path) -> dict[str, str]:
    """Make four images unusable, one way each; {image file: the reason prepare gives}."""
    images = sorted((raw / "train_images").glob("*.png"))[:4]
    images[0].unlink()
    images[1].write_bytes(b"")
    images[2].write_text("not an image")
    images[3].write_bytes(images[3].read_bytes()[:60])
    return {
        images[0].name: "missing file",
        images[1].name: "zero-byte file",
        images[2].name: "not an image",
        images[3].name: "corrupt or truncated",
    }


@on_ray
def test_prepare_and_shard_on_two_nodes_match_a_local_run(
    digits_project, two_nodes, tmp_path, monkeypatch
):
    address, node_ids = two_nodes
    _, built = digits_project
    local = PipelinePaths(tmp_path / "local", "digits")
    remote = PipelinePaths(tmp_path / "remote", "digits")
    shutil.copytree(built.root, local.root)
    shutil.rmtree(local.root / "data" / "digits" / "shards")
    expected_reasons = _damage(local.raw)
    shutil.copytree(local.root, remote.root)
    trace = tmp_path / "trace"
    monkeypatch.setenv("ATTNPIPE_TRACE_DIR", str(trace))

    for stage in ("prepare", "shard"):
        assert main(["--root", str(local.root), stage, "digits", "--no-progress"]) == 0
        argv = ["--root", str(remote.root), stage, "digits", "--no-progress"]
        assert main([*argv, "--address", address]) == 0

    for name in OUTPUTS:
        assert (remote.root / "data" / "digits" / name).read_bytes() == (
            local.root / "data" / "digits" / name
        ).read_bytes(), name
    assert _digest(remote.shards) == _digest(local.shards)  # every tar and index.json
    assert len(_digest(local.shards)) >= 13

    with local.rejected.open() as handle:
        reasons = {Path(row["path"]).name: row["reason"] for row in csv.DictReader(handle)}
    assert set(reasons) == set(expected_reasons)
    for name, reason in expected_reasons.items():
        assert reasons[name].startswith(reason), reasons

    # Both nodes did work in each stage; every shard was written by a task.
    for kind in ("scan", "shard"):
        assert {task["node_id"] for task in _trace(trace, kind)} == node_ids, kind
    index = json.loads((local.shards / "index.json").read_text())
    names = [entry["name"] for block in index["splits"].values() for entry in block["shards"]]
    assert sorted(task["name"] for task in _trace(trace, "shard")) == sorted(names)


def _photos_project(root: Path, count: int) -> tuple[PipelinePaths, int]:
    """Photo-sized JPEGs (500 x 375, ImageNet's most common size; noise over gradients) in the
    cassava layout: (paths, the images' bytes)."""
    import csv
    import io

    import numpy as np
    import yaml
    from PIL import Image

    paths = PipelinePaths(root, "photos")
    images = paths.raw / "train_images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    base = np.stack([x * 255 / 500, y * 255 / 375, (x + y) * 127 / 875], axis=-1)
    total = 0
    with (paths.raw / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "label"])
        for i in range(count):
            pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
            total += (images / f"{i:03d}.jpg").write_bytes(buffer.getvalue())
            writer.writerow([f"{i:03d}.jpg", i % 3])
    (paths.raw / "label_num_to_disease_map.json").write_text('{"0": "a", "1": "b", "2": "c"}')
    recipe = {
        "source": {"kind": "kaggle-competition", "competition": "photos"},
        "shard": {"image_size": 128, "maxcount": 16, "min_shards": 1},
        "model": {"name": "resnet50"},
    }
    (root / "pipelines").mkdir()
    (root / "pipelines" / "photos.yaml").write_text(yaml.safe_dump(recipe))
    return paths, total


@on_ray
def test_the_driver_moves_under_one_percent_of_the_image_bytes(
    two_nodes, tmp_path, monkeypatch, capsys
):
    """Counted: every task's arguments and result, as serialized for the object store. Then a
    shared root the nodes cannot see fails in one line (on the same cluster: one start-up)."""
    address, _ = two_nodes
    local, image_bytes = _photos_project(tmp_path / "local", 60)
    remote = PipelinePaths(tmp_path / "remote", "photos")
    shutil.copytree(local.root, remote.root)
    trace = tmp_path / "trace"
    monkeypatch.setenv("ATTNPIPE_TRACE_DIR", str(trace))
    for stage in ("prepare", "shard"):
        assert main(["--root", str(local.root), stage, "photos", "--no-progress"]) == 0
        argv = ["--root", str(remote.root), stage, "photos", "--no-progress"]
        assert main([*argv, "--address", address]) == 0
    assert _digest(remote.shards) == _digest(local.shards)
    assert remote.manifest.read_bytes() == local.manifest.read_bytes()
    tasks = _trace(trace, "scan") + _trace(trace, "shard")
    assert {t["kind"] for t in tasks} == {"scan", "shard"}
    moved = sum(t["sent_bytes"] + t["received_bytes"] for t in tasks)
    assert all(t["sent_bytes"] > 0 and t["received_bytes"] > 0 for t in tasks)
    print(f"driver <-> tasks: {moved} bytes for {image_bytes} bytes of images")
    assert moved < 0.01 * image_bytes, (moved, image_bytes)

    capsys.readouterr()
    argv = ["--root", str(remote.root), "prepare", "photos", "--no-progress", "--address", address]
    assert main([*argv, "--shared-root", str(tmp_path / "not-shared")]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("attnpipe: error: node ")
    assert "cannot see" in error and "--shared-root" in error


@on_ray
def test_tasks_read_images_from_and_write_shards_to_object_storage(
    module_bucket, two_nodes, tmp_path
):
    """--shared-root s3://...: the raw images are only on S3 (moto on loopback); the tasks
    read them there and write the tars and offsets there, the same bytes as a local run."""
    from attnpipe import storage

    address, _ = two_nodes
    local, _ = _photos_project(tmp_path / "local", 24)
    remote = PipelinePaths(tmp_path / "remote", "photos")
    shutil.copytree(local.root, remote.root)
    root = module_bucket.url("project")
    for path in sorted(remote.raw.rglob("*")):
        if path.is_file():
            storage.upload_file(path, storage.join(root, path.relative_to(remote.root).as_posix()))
    shutil.rmtree(remote.raw / "train_images")  # the tasks cannot read them from here
    for stage in ("prepare", "shard"):
        assert main(["--root", str(local.root), stage, "photos", "--no-progress"]) == 0
        argv = ["--root", str(remote.root), stage, "photos", "--no-progress"]
        assert main([*argv, "--address", address, "--shared-root", root]) == 0
    assert remote.manifest.read_bytes() == local.manifest.read_bytes()
    published = storage.join(root, "data", "photos", "shards")
    expected = {p.name: p.stat().st_size for p in local.shards.iterdir()}
    assert storage.list_files(published) == expected
    for name in expected:
        data = storage.read_bytes(storage.join(published, name))
        assert data == (local.shards / name).read_bytes(), name


@on_ray
def test_an_image_gone_since_prepare_fails_the_remote_shard_in_one_line(
    digits_project, two_nodes, tmp_path, capsys
):
    """The task's error (raised on another node) reaches the command as itself."""
    address, _ = two_nodes
    _, built = digits_project
    paths = PipelinePaths(tmp_path / "project", "digits")
    shutil.copytree(built.root, paths.root)
    gone = sorted((paths.raw / "train_images").glob("*.png"))[7]
    gone.unlink()
    argv = ["--root", str(paths.root), "shard", "digits", "--no-progress", "--address", address]
    assert main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("attnpipe: error: ")
    assert f"{gone.name} changed since prepare (missing file)" in error
    assert "re-run `attnpipe prepare`" in error


@pytest.mark.parametrize("stage", ["prepare", "shard"])
def test_an_unreachable_cluster_fails_in_one_line_before_any_output_changes(
    digits_project, tmp_path, capsys, stage
):
    _, built = digits_project
    paths = PipelinePaths(tmp_path / "project", "digits")
    shutil.copytree(built.root, paths.root)
    before = _digest(paths.root / "data")
    argv = ["--root", str(paths.root), stage, "digits", "--no-progress"]
    assert main([*argv, "--address", "127.0.0.1:1"]) == 1  # nothing listens on port 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("attnpipe: error: cannot reach the Ray cluster at 127.0.0.1:1 (")
    assert "\n" not in error and "ray start --head" in error
    assert main([*argv, "--address", "head-without-port"]) == 1
    assert "is not HOST:PORT" in capsys.readouterr().err
    assert _digest(paths.root / "data") == before


def test_tasks_go_to_the_least_loaded_node_per_cpu():
    """The data stages' task placement, without a cluster: every node gets work as soon as
    there are as many tasks as nodes, a node with twice the CPUs twice the tasks, a finished
    task's node the next one, and nodes that join are used."""
    from attnpipe.data.ray_tasks import NodeLoad

    nodes = {"a": 1, "b": 2}
    load = NodeLoad(lambda: dict(nodes))
    assert load.limit() == 2 * 3  # IN_FLIGHT_PER_CPU per CPU
    assert [load.take() for _ in range(6)] == ["a", "b", "b", "a", "b", "b"]
    load.release("a")
    assert load.take() == "a"
    nodes["c"] = 1
    load.read_at = None  # as after REFRESH_S
    assert load.limit() == 2 * 4 and load.take() == "c"
    assert NodeLoad(dict).take() is None  # no node with a CPU yet: Ray places the task
