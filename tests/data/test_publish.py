"""Shards published to object storage (a real S3 API on loopback) read back sample for sample."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from attnpipe import storage
from attnpipe.cli import main
from attnpipe.config import ConfigError, apply_overrides
from attnpipe.data.loaders import ShardStream, build_transform, split_info
from attnpipe.data.shard import ShardError, publish_shards, read_index, shard_location
from attnpipe.paths import PipelinePaths
from attnpipe.tracking import data_version


def _sample_ids(location: str, split: str, augment) -> list[str]:
    info = split_info(location, split)
    stream = ShardStream(
        urls=info.urls,
        rank=0,
        world_size=1,
        transform=build_transform(augment, 32, train=False),
        train=False,
    )
    return [sample_id for _, _, sample_id in stream]


def test_shard_command_publishes_shards_that_stream_from_s3_like_the_local_ones(
    digits_project, s3_bucket, tmp_path, capsys
):
    recipe, built = digits_project
    paths = PipelinePaths(tmp_path / "project", "digits")
    shutil.copytree(built.root, paths.root)
    url = s3_bucket.url("digits", "shards")
    # A shard left by an earlier, larger plan must not survive a new publish.
    stale = tmp_path / "stale.tar"
    stale.write_bytes(b"old")
    storage.upload_file(stale, storage.join(url, "train-00099.tar"))

    # One shard writer, in this process: publishing does not depend on how the shards were
    # written, and a pool of workers costs seconds of CPU to start (each imports torch).
    argv = ["--root", str(paths.root), "shard", "digits", "--no-progress", "--publish", url]
    argv += ["--set", "shard.workers=1"]
    assert main(argv) == 0
    assert f"to {url}" in capsys.readouterr().out
    index = read_index(paths.shards)

    local_files = {p.name: p.stat().st_size for p in paths.shards.iterdir()}
    assert storage.list_files(url) == local_files  # every shard + index.json, same sizes
    assert read_index(url) == index
    for split in ("val", "test"):
        from_s3 = _sample_ids(url, split, recipe.augment)
        assert from_s3 == _sample_ids(str(paths.shards), split, recipe.augment)
        assert len(from_s3) == index["splits"][split]["samples"]
    info = split_info(url, "train")
    assert all(u.startswith(f"s3://{s3_bucket.name}/digits/shards/train-") for u in info.urls)
    # The run identity does not depend on where the same shards are read from.
    assert data_version(paths.root, "digits", url) == data_version(
        paths.root, "digits", paths.shards
    )

    published = apply_overrides(recipe, {"shard.publish_to": url}, origin="test")
    assert shard_location(published, paths) == url
    assert shard_location(recipe, paths) == str(paths.shards.resolve())


def test_missing_published_index_says_how_to_publish(s3_bucket):
    with pytest.raises(ShardError, match=r"shard\.publish_to"):
        read_index(s3_bucket.url("nothing", "here"))


def test_publish_to_a_shared_folder(digits_project, tmp_path):
    _, paths = digits_project
    target = tmp_path / "shared" / "digits"
    index = publish_shards(paths.shards, str(target))
    entries = [e for b in index["splits"].values() for e in b["shards"]]
    names = {e["name"] for e in entries} | {e["offsets_file"] for e in entries}
    assert names | {"index.json"} == {p.name for p in target.iterdir()}
    for name in names:
        assert (target / name).read_bytes() == (paths.shards / name).read_bytes()


@pytest.mark.parametrize("bad", ["relative/shards", "shards"])
def test_publish_to_must_be_shared_by_every_node(digits_project, bad):
    recipe, _ = digits_project
    with pytest.raises(ConfigError, match="publish_to must be a URL"):
        apply_overrides(recipe, {"shard.publish_to": bad}, origin="test")


def test_local_paths_stay_local(tmp_path: Path):
    assert not storage.is_url(tmp_path) and not storage.is_url(f"file://{tmp_path}")
    assert storage.is_url("s3://bucket/key") and storage.is_url("gs://bucket/key")
