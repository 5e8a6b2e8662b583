"""Fixtures of the in-process training tests."""

from __future__ import annotations

import pytest

from attnpipe.config import Recipe, load_recipe
from attnpipe.paths import PipelinePaths
from tests.conftest import TINY_OVERRIDES, write_project

# A fifth of the digits for training: 361 images, 11 batches of 32. Most of an in-process
# run's time is its training steps and the images they decode, and the loop tests check what
# the loop does around them (checkpoints, resumes, the schedule, the EMA), for any number of
# steps: an epoch here costs a quarter of one on the shared project (1,257 training images,
# 39 steps). Validation keeps the shared project's share (179 images). Prepared and sharded
# in this process: for 1,797 tiny images, starting the stages' process pools costs 4 times
# their work (2.6 s of CPU in all, against 11 s).
SMALL_OVERRIDES = {
    **TINY_OVERRIDES,
    "prepare": {"splits": {"train": 0.2, "val": 0.1, "test": 0.7}, "workers": 1},
    "shard": {"workers": 1},
}


@pytest.fixture(scope="session")
def small_digits_project(
    digits_project: tuple[Recipe, PipelinePaths], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Recipe, PipelinePaths]:
    """`digits_project` with a smaller training split: prepare and shard again, in-process,
    from the shared project's fetched images (linked, read-only). Shared read-only."""
    from attnpipe.data.prepare import prepare
    from attnpipe.data.shard import shard

    _, shared = digits_project
    root = write_project(tmp_path_factory.mktemp("small-digits"), SMALL_OVERRIDES)
    recipe = load_recipe("digits", root)
    paths = PipelinePaths(root, "digits")
    paths.data.mkdir(parents=True)
    paths.raw.symlink_to(shared.raw, target_is_directory=True)
    prepare(recipe, paths, progress=False)
    shard(recipe, paths, progress=False)
    return recipe, paths
