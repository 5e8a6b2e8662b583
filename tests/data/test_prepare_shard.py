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

# The session project was prepared and sharded by pools of worker processes (workers: 0, one
# per core). A rerun here works in this process instead: a pool costs seconds of CPU to start
# (each shard worker imports torch) against a fraction of a second of work on the digits, and
# equal bytes from one process and from a pool show that the output depends on neither the run
# nor the number of workers (test_resized_jpeg_shards_... also runs pools against one process).
IN_PROCESS = {**TINY_OVERRIDES, "prepare": {"workers": 1}, "shard": {"workers": 1}}


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
    # per class and split, beside the totals (DVC metrics) rather than in them
    assert paths.class_counts.read_text().splitlines()[4].startswith("three,")


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
            assert len(keys) == entry["samples"]
            total += entry["samples"]
        assert total == block["samples"] == sum(block["class_counts"].values()), split
        assert list(block["class_counts"]) == index["classes"]


def test_keys_with_dots_survive_webdataset_splitting():
    key = sample_key("digit_0001.png")
    assert "." not in key and key != sample_key("digit_0001_png")


def test_two_runs_are_byte_identical(tmp_path: Path, digits_project):
    _, built = digits_project
    root = write_project(tmp_path, IN_PROCESS)
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


def _photo(seed: int, size=(160, 120)) -> bytes:
    """Noise over gradients: compresses like a photo, and every file is different."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([x * 255 / size[0], y * 255 / size[1], (x + y) * 127 / sum(size)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _jpeg_project(root: Path, workers: int, count: int = 40):
    import csv

    from attnpipe.config import parse_recipe

    paths = PipelinePaths(root, "photos")
    images = paths.raw / "train_images"
    images.mkdir(parents=True)
    with (paths.raw / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "label"])
        for i in range(count):
            # One portrait photo: the shorter side is then its width.
            size = (120, 160) if i == 7 else (160, 120)
            (images / f"{i:03d}.jpg").write_bytes(_photo(i, size))
            writer.writerow([f"{i:03d}.jpg", i % 3])
    (paths.raw / "label_num_to_disease_map.json").write_text('{"0": "a", "1": "b", "2": "c"}')
    recipe = parse_recipe(
        {
            "source": {"kind": "kaggle-competition", "competition": "photos"},
            "prepare": {"workers": workers},
            "shard": {
                "image_size": 48,
                "format": "jpg",
                "jpeg_quality": 90,
                "maxcount": 5,
                "min_shards": 2,
                "workers": workers,
            },
            "model": {"name": "resnet50"},
        },
        name="photos",
    )
    return recipe, paths


def test_resized_jpeg_shards_are_byte_identical_across_runs_and_workers(tmp_path: Path):
    import io

    from PIL import Image

    digests, manifests = [], []
    for run, workers in enumerate((2, 1)):  # parallel writers, then a single process
        recipe, paths = _jpeg_project(tmp_path / f"run{run}", workers)
        prepare(recipe, paths, progress=False)
        shard(recipe, paths, progress=False)
        digests.append(_digest(paths.shards))
        manifests.append(paths.manifest.read_bytes())
    assert digests[0] == digests[1] and manifests[0] == manifests[1]

    index = json.loads((paths.shards / "index.json").read_text())
    assert index["splits"]["train"]["samples"] == 28
    for block in index["splits"].values():
        assert len(block["shards"]) >= 2  # min_shards
        assert all(entry["samples"] <= 5 for entry in block["shards"])  # maxcount
    sizes = {}
    for tar_path in paths.shards.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    image = Image.open(io.BytesIO(tar.extractfile(member).read()))
                    sizes[member.name.split(".")[0]] = image.size
    assert len(sizes) == 40
    assert sizes[sample_key("007.jpg")] == (48, 64)  # portrait: shorter side 48, aspect kept
    assert all(size == (64, 48) for key, size in sizes.items() if key != sample_key("007.jpg"))


def test_shard_plan_respects_maxcount_maxsize_and_min_shards():
    from attnpipe.config import ShardConfig
    from attnpipe.data.shard import plan_shard_counts

    config = ShardConfig(maxcount=100, maxsize=1_000_000, min_shards=4)
    assert plan_shard_counts(1000, 10, config) == 10  # by count
    assert plan_shard_counts(50, 7_500_000, config) == 8  # by bytes
    assert plan_shard_counts(50, 10, config) == 4  # at least min_shards
    assert plan_shard_counts(3, 10, config) == 3  # never more shards than samples


def test_shard_decoding_skips_resolution_it_does_not_need(tmp_path: Path):
    """JPEG DCT scaling: for a 48-pixel target a 160x120 photo is decoded at 80x60."""
    from attnpipe.data.images import load_rgb

    path = tmp_path / "p.jpg"
    path.write_bytes(_photo(1))
    assert load_rgb(path, 10**8).size == (160, 120)
    assert load_rgb(path, 10**8, draft_size=48).size == (80, 60)  # still >= 48 on its short side
    assert load_rgb(path, 10**8, draft_size=100).size == (160, 120)  # no room to halve


def test_a_manifest_written_in_row_groups_holds_the_same_rows_and_shards(
    tmp_path: Path, digits_project, monkeypatch
):
    """prepare writes the manifest a row group at a time (its memory stays flat at ImageNet
    size); the rows, their order and the shards made from them are those of one group."""
    from attnpipe.data import prepare as prepare_module

    _, built = digits_project
    root = write_project(tmp_path, IN_PROCESS)
    recipe = load_recipe("digits", root)
    paths = PipelinePaths(root, "digits")
    import shutil

    shutil.copytree(built.raw, paths.raw)
    monkeypatch.setattr(prepare_module, "MANIFEST_ROW_GROUP", 100)
    prepare(recipe, paths, progress=False)
    shard(recipe, paths, progress=False)
    grouped, whole = pq.ParquetFile(paths.manifest), pq.ParquetFile(built.manifest)
    assert whole.num_row_groups == 1
    assert grouped.num_row_groups == -(-whole.metadata.num_rows // 100)
    assert grouped.read().equals(whole.read())
    assert _digest(paths.shards) == _digest(built.shards)


def test_manifest_paths_are_workspace_names_even_for_files_linked_to_a_cache(tmp_path: Path):
    """A raw file DVC linked to its cache (cache.type symlink) keeps its name under the
    project in the manifest, not the cache file's."""
    from attnpipe.data.scan import workspace_name

    root, cache = tmp_path / "project", tmp_path / "cache"
    (root / "raw").mkdir(parents=True)
    cache.mkdir()
    (cache / "ab12").write_bytes(b"x")
    (root / "raw" / "a.png").symlink_to(cache / "ab12")
    assert workspace_name(root / "raw" / "a.png", root) == "raw/a.png"
    assert workspace_name(str(root / "raw" / "a.png"), str(root)) == "raw/a.png"
    assert workspace_name(root, root) == "."
    assert workspace_name(cache / "ab12", root) == str(cache / "ab12")  # outside: as given
    assert workspace_name(str(root / "raw" / "a.png"), "/") == str(root / "raw" / "a.png")[1:]
