"""Shared fixtures: a tiny digits project on disk, built once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from attnpipe.config import Recipe, load_recipe
from attnpipe.paths import PipelinePaths

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

# Small enough for two CPU cores in seconds; the same code path as the demo.
TINY_OVERRIDES = {
    "model": {"name": "attention56_cifar", "input_size": 32, "kwargs": {"width_multiplier": 0.25}},
    "train": {
        "workers": 2,
        "epochs": 3,
        "batch_size": 32,
        # Converges in the ~60 steps three tiny epochs give; SGD's warmup needs more.
        "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0001},
        "schedule": {"name": "constant"},
        "max_failures": 1,
    },
}


def write_project(root: Path, overrides: dict | None = None, name: str = "digits") -> Path:
    """Copy the repository's pipeline files into `root`, with recipe overrides merged in."""
    for item in ("dvc.yaml", "params.yaml", "pipelines", ".dvcignore"):
        source = REPO / item
        if source.is_dir():
            shutil.copytree(source, root / item, dirs_exist_ok=True)
        elif source.exists():
            shutil.copy(source, root / item)
    recipe_path = root / "pipelines" / f"{name}.yaml"
    data = yaml.safe_load(recipe_path.read_text())
    for section, values in (overrides or {}).items():
        data[section] = {**data.get(section, {}), **values}
    recipe_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return root


@pytest.fixture(scope="session")
def digits_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Recipe, PipelinePaths]:
    """fetch + prepare + shard of the digits, done once (in-process) and shared read-only."""
    from attnpipe.data.prepare import prepare
    from attnpipe.data.shard import shard
    from attnpipe.data.sources import fetch

    root = write_project(tmp_path_factory.mktemp("digits"), TINY_OVERRIDES)
    recipe = load_recipe("digits", root)
    paths = PipelinePaths(root, "digits")
    fetch(recipe, paths.raw)
    prepare(recipe, paths, progress=False)
    shard(recipe, paths, progress=False)
    return recipe, paths
