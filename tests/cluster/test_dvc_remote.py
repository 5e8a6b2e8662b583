"""A DVC remote on S3 (moto's server on 127.0.0.1): `dvc push`, then `dvc pull` in a fresh clone.

Real git and DVC (dvc-s3) in subprocesses. The endpoint reaches DVC only through the remote's
`endpointurl` setting (AWS_ENDPOINT_URL is removed from its environment), as docs/experiments.md
shows it; the credentials only through the environment, never through .dvc/config.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import S3Bucket, run_in

# Real Ray / DVC runs: minutes on an idle 2-core machine; the allowance covers a busy one.
pytestmark = [pytest.mark.ray, pytest.mark.dvc, pytest.mark.timeout(1200)]


def _run(cwd: Path, bucket: S3Bucket, *command: str) -> str:
    """With the bucket's credentials (set by its fixture); the endpoint only from .dvc/config."""
    return run_in(cwd, *command, env=bucket.env, unset=("AWS_ENDPOINT_URL",))


def test_dvc_push_then_pull_into_a_fresh_clone_round_trips_data_and_model(s3_bucket, tmp_path):
    import boto3
    import torch

    repo = tmp_path / "repo"
    (repo / "data/digits/raw").mkdir(parents=True)
    (repo / "models/digits").mkdir(parents=True)
    data = {
        "data/digits/raw/train.csv": b"image_id,label\n0.png,0\n1.png,7\n",
        "data/digits/raw/label_map.json": b'{"0": "zero", "7": "seven"}\n',
    }
    for name, blob in data.items():
        (repo / name).write_bytes(blob)
    torch.save({"weight": torch.arange(6.0).reshape(2, 3)}, repo / "models/digits/model.pt")
    model_bytes = (repo / "models/digits/model.pt").read_bytes()

    _run(repo, s3_bucket, "git", "init", "-q")
    _run(repo, s3_bucket, "dvc", "init", "-q")
    _run(repo, s3_bucket, "dvc", "add", "-q", "data/digits/raw", "models/digits/model.pt")
    remote = s3_bucket.url("dvcstore")
    _run(repo, s3_bucket, "dvc", "remote", "add", "-d", "storage", remote)
    _run(repo, s3_bucket, "dvc", "remote", "modify", "storage", "endpointurl", s3_bucket.endpoint)
    config = (repo / ".dvc/config").read_text()
    assert s3_bucket.env["AWS_SECRET_ACCESS_KEY"] not in config
    _run(repo, s3_bucket, "git", "add", "-A")
    _run(repo, s3_bucket, "git", "commit", "-q", "-m", "data and model tracked by DVC")

    pushed = _run(repo, s3_bucket, "dvc", "push")
    assert re.search(r"\b4 files pushed", pushed), pushed
    client = boto3.client("s3", endpoint_url=s3_bucket.endpoint)
    objects = client.list_objects_v2(Bucket=s3_bucket.name, Prefix="dvcstore/")
    # Two data files, the directory manifest and the model, content-addressed.
    assert len(objects.get("Contents", [])) == 4

    clone = tmp_path / "clone"
    _run(tmp_path, s3_bucket, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "models/digits/model.pt").exists()
    _run(clone, s3_bucket, "dvc", "pull")

    for name, blob in data.items():
        assert (clone / name).read_bytes() == blob
    assert (clone / "models/digits/model.pt").read_bytes() == model_bytes
    restored = torch.load(clone / "models/digits/model.pt", weights_only=True)
    assert torch.equal(restored["weight"], torch.arange(6.0).reshape(2, 3))
    assert "in sync" in _run(clone, s3_bucket, "dvc", "status", "--cloud")
