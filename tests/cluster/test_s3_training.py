"""Two workers train from shards on S3 and checkpoint to S3; a relaunch finds the run there.

A real S3 API (moto's server on 127.0.0.1) and a real Ray cluster. The project's local shards
are deleted before training and no checkpoint is ever written locally, so everything the runs
read can only have come from the bucket. (A worker killed mid-run restarting from the latest
checkpoint is storage-agnostic Ray behaviour, covered in tests/train/test_fault_tolerance.py.)
"""

from __future__ import annotations

import shutil

import pytest

from attnpipe import storage
from attnpipe.config import apply_overrides
from attnpipe.data.shard import publish_shards
from attnpipe.modelfile import load_model_file
from attnpipe.paths import PipelinePaths
from attnpipe.runs import best_weights_dir
from attnpipe.storage import list_tree
from attnpipe.train.finished import finished_location
from attnpipe.train.launch import build_loop_config, train
from tests.train.trace import events

# Real Ray / DVC runs: minutes on an idle 2-core machine; the allowance covers a busy one.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]


def _s3_checkpoints(bucket, run_name: str) -> dict[str, list[str]]:
    """{checkpoint folder: its files} under the run's folder in the bucket."""
    import boto3

    client = boto3.client("s3", endpoint_url=bucket.endpoint)
    listing = client.list_objects_v2(Bucket=bucket.name, Prefix=f"ckpt/{run_name}/")
    found: dict[str, list[str]] = {}
    for item in listing.get("Contents", []):
        parts = item["Key"].split("/")
        if len(parts) == 4 and parts[2].startswith("checkpoint_") and parts[3]:
            found.setdefault(parts[2], []).append(parts[3])
    return found


def test_two_workers_train_from_s3_shards_checkpoint_to_s3_and_a_relaunch_resumes_from_s3(
    digits_project, s3_bucket, tmp_path, monkeypatch
):
    recipe, built = digits_project
    paths = PipelinePaths(tmp_path / "project", "digits")
    shutil.copytree(built.root, paths.root)
    shards_url = s3_bucket.url("digits", "shards")
    publish_shards(paths.shards, shards_url)
    shutil.rmtree(paths.shards)  # from here on the shards exist only in the bucket
    recipe = apply_overrides(
        recipe,
        {
            "shard.publish_to": shards_url,
            "train.storage_path": s3_bucket.url("ckpt"),
            "train.epochs": 2,
            "train.checkpoints_to_keep": 2,
        },
        origin="test",
    )
    run_name = build_loop_config(recipe, paths).run_name
    monkeypatch.setenv("WANDB_MODE", "offline")
    trace = tmp_path / "trace"
    monkeypatch.setenv("ATTNPIPE_TRACE_DIR", str(trace))

    first = train(recipe, paths)

    assert first.run_name == run_name and first.epochs_run == 2 and first.resumed_from == []
    for rank in (0, 1):  # both ranks trained both epochs, from the bucket's shards
        assert [e["epoch"] for e in events(trace, rank) if e["event"] == "epoch"] == [1, 2]
    checkpoints = _s3_checkpoints(s3_bucket, run_name)
    assert len(checkpoints) == 2  # epochs 1 and 2, on S3 only
    assert all(files == ["checkpoint.pt"] for files in checkpoints.values())
    assert not paths.shards.exists() and not paths.checkpoints.exists()
    assert paths.model_file.is_file()
    # The offline W&B run did not stay on rank 0's node (an autoscaler may delete it): it is
    # kept beside the checkpoints, and the driver copied it back into the project.
    kept = list_tree(s3_bucket.url("ckpt", "wandb"))
    assert any(name.endswith(".wandb") for name in kept), kept
    copied = list((paths.root / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [p.name for p in copied] == [
        name.rsplit("/", 1)[-1] for name in kept if name.endswith(".wandb")
    ]

    # Launched again (say on a laptop, after the run finished on a cluster), the same run is
    # found finished from the record its end left on S3 (attnpipe.train.finished): the driver
    # trains nothing, starts no worker, and rebuilds model.pt from the best weights there.
    assert storage.exists(finished_location(best_weights_dir(s3_bucket.url("ckpt"), run_name)))
    paths.model_file.unlink()
    trace2 = tmp_path / "trace2"
    monkeypatch.setenv("ATTNPIPE_TRACE_DIR", str(trace2))

    second = train(recipe, paths)

    for rank in (0, 1):
        assert events(trace2, rank) == []  # no worker started, no epoch trained
    assert second.run_name == run_name and second.epochs_run == 2
    assert (second.best_epoch, second.best_metrics) == (first.best_epoch, first.best_metrics)
    assert _s3_checkpoints(s3_bucket, run_name) == checkpoints  # nothing new written
    _, payload = load_model_file(paths.model_file)
    assert payload["run_name"] == run_name and payload["metrics"] == first.best_metrics
    assert not paths.checkpoints.exists()
