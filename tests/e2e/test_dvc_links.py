"""The project's DVC cache type: outputs are links to one cached copy, and stages run by hand
afterwards write new files instead of writing through a link into the cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from attnpipe.cli import main
from tests.conftest import ReproProject, run_in


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


def test_dvc_repro_keeps_one_copy_of_the_data(repro_project: ReproProject):
    root = repro_project.root
    data, cache = root / "data" / "digits", root / ".dvc" / "cache"
    workspace = _stored_bytes(data, root / "models" / "digits" / "model.pt")
    assert workspace > 1_000_000
    # The workspace's files are the cache's (hardlinks on this ext4 machine): no second copy.
    assert _stored_bytes(data, root / "models" / "digits", cache / "files") < 1.01 * (
        _stored_bytes(data, root / "models" / "digits")
    )
    for output in (data / "manifest.parquet", data / "raw" / "train.csv", data / "shards"):
        first = output if output.is_file() else next(output.glob("*.tar"))
        assert first.stat().st_nlink == 2, first
        assert first.stat().st_mode & 0o222 == 0, first  # DVC protects linked outputs


def test_stages_run_by_hand_leave_the_cache_intact(repro_project: ReproProject, tmp_path: Path):
    root = tmp_path / "project"
    run_in(tmp_path, "cp", "-a", str(repro_project.root), str(root))  # keeps the hardlinks
    manifest = root / "data" / "digits" / "manifest.parquet"
    assert manifest.stat().st_nlink == 2
    # Other settings, so that writing into a link would change the cached bytes (and root,
    # which tests may run as, ignores the read-only mode).
    recipe_path = root / "pipelines" / "digits.yaml"
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["source"]["image_size"] = 24
    recipe["prepare"]["seed"] = 1
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    for stage in ("fetch", "prepare"):
        assert main(["--root", str(root), stage, "digits", "--no-progress"]) == 0
    assert manifest.stat().st_nlink == 1  # a new file, not the cached one
    assert _damaged_cache_files(root / ".dvc" / "cache") == []
    # DVC puts the recorded outputs back from its cache, as they were.
    run_in(root, "dvc", "checkout", "--force", "prepare@digits")
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["prepare@digits"]
    recorded = next(o["md5"] for o in lock["outs"] if o["path"].endswith("manifest.parquet"))
    assert hashlib.md5(manifest.read_bytes()).hexdigest() == recorded
