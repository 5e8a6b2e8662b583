"""The project's DVC cache type: outputs are links to one cached copy, and stages run by hand
afterwards write new files instead of writing through a link into the cache."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import yaml

from attnpipe.cli import main
from tests.conftest import REPO, TINY_OVERRIDES, run_in, write_project


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]


def _stored_bytes(*folders: Path) -> int:
    """Bytes of the files under `folders`, each inode once (as `du` counts them); DVC's own
    listings of directory outputs (*.dir, ~90 bytes per file) are left out."""
    inodes = {}
    for folder in folders:
        for path in _files(folder):
            if path.suffix != ".dir":
                stat = path.stat()
                inodes[(stat.st_dev, stat.st_ino)] = stat.st_size
    return sum(inodes.values())


def _damaged_cache_files(cache: Path) -> list[str]:
    """Cached files whose content no longer has the hash they are stored under."""
    damaged = []
    for path in _files(cache / "files" / "md5"):
        if path.suffix == ".dir":
            continue
        if hashlib.md5(path.read_bytes()).hexdigest() != path.parent.name + path.name:
            damaged.append(str(path))
    return damaged


def test_outputs_are_links_to_one_cached_copy_and_manual_stages_keep_the_cache_intact(
    tmp_path: Path,
):
    root = tmp_path / "project"
    root.mkdir()
    write_project(root, TINY_OVERRIDES)
    run_in(root, "git", "init", "-q")
    run_in(root, "dvc", "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    run_in(root, "dvc", "repro", "prepare@digits")
    data, cache = root / "data" / "digits", root / ".dvc" / "cache"

    # One copy: the workspace's files are the cache's (hardlinks on this ext4 machine).
    workspace = _stored_bytes(data)
    assert workspace > 500_000
    assert _stored_bytes(data, cache / "files") < 1.01 * workspace
    manifest = data / "manifest.parquet"
    assert manifest.stat().st_nlink == 2
    assert manifest.stat().st_mode & 0o222 == 0  # DVC protects linked outputs: read-only

    # Stages run by hand with other settings write new files; the cached copies are untouched
    # (root ignores the read-only mode, so writing into a link would change the cache).
    recipe_path = root / "pipelines" / "digits.yaml"
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["source"]["image_size"] = 24
    recipe["prepare"]["seed"] = 1
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    for stage in ("fetch", "prepare"):
        assert main(["--root", str(root), stage, "digits", "--no-progress"]) == 0
    assert manifest.stat().st_nlink == 1
    assert _damaged_cache_files(cache) == []
    # And DVC puts the recorded outputs back from its cache, as they were.
    run_in(root, "dvc", "checkout", "--force", "prepare@digits")
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["prepare@digits"]
    recorded = next(o["md5"] for o in lock["outs"] if o["path"].endswith("manifest.parquet"))
    assert hashlib.md5(manifest.read_bytes()).hexdigest() == recorded
