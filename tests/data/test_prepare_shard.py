"""prepare + shard on the real digits: counts, determinism, index, and stable bytes."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq

from attnpipe.config import load_recipe
from attnpipe.data.prepare import prepare
from attnpipe.data.shard import sample_key, shard
from attnpipe.paths import PipelinePaths
from tests.conftest import TINY_OVERRIDES, write_project


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_manifest_and_report_describe_every_sample(digits_project):
    _, paths = digits_project
    table = pq.read_table(paths.manifest).to_pylist()
    assert len(table) == 1797  # scikit-learn's digits, none rejected
    assert len({row["id"] for row in table}) == 1797
    assert {row["split"] for row in table} == {"train", "val", "test"}
    first = table[0]
    assert set(first) >= {"id", "path", "label", "class_name", "group", "split", "fold", "sha256"}
    assert (paths.root / first["path"]).is_file()
    report = json.loads(paths.data_report.read_text())
    assert sum(report["samples"].values()) == 1797
    assert report["rejected"] == 0
    assert json.loads(paths.classes.read_text())["classes"][3] == "three"


def test_shard_index_matches_the_tars(digits_project):
    _, paths = digits_project
    index = json.loads((paths.shards / "index.json").read_text())
    for split, block in index["splits"].items():
        assert len(block["shards"]) >= 4
        total = 0
        for entry in block["shards"]:
            with tarfile.open(paths.shards / entry["name"]) as tar:
                members = tar.getmembers()
            assert all(m.mtime == 0 for m in members)
            keys = {m.name.split(".", 1)[0] for m in members}
            assert len(keys) == entry["samples"] == sum(entry["classes"].values())
            total += entry["samples"]
        assert total == block["samples"], split


def test_keys_with_dots_survive_webdataset_splitting():
    key = sample_key("digit_0001.png")
    assert "." not in key and key != sample_key("digit_0001_png")


def test_two_runs_are_byte_identical(tmp_path: Path, digits_project):
    _, built = digits_project
    root = write_project(tmp_path, TINY_OVERRIDES)
    recipe = load_recipe("digits", root)
    paths = PipelinePaths(root, "digits")
    # Same raw input as the session project, fresh outputs.
    import shutil

    shutil.copytree(built.raw, paths.raw)
    prepare(recipe, paths, progress=False)
    shard(recipe, paths, progress=False)
    assert paths.manifest.read_bytes() == built.manifest.read_bytes()
    assert _digest(paths.shards) == _digest(built.shards)
    first = _digest(paths.shards)
    shard(recipe, paths, progress=False)  # and again, over its own output
    assert _digest(paths.shards) == first
