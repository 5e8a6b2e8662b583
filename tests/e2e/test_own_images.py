"""Your own images in one command: the README's "Your own images" block, run as written on a
generated folder of split folders (standing for /path/to/images).

Real everything: the folder is fetched (linked), validated, split by its owner's folders,
sharded, trained with Ray Train and evaluated. The one edit is the one the README suggests,
in the recipe: one epoch instead of the GPU default.
"""

from __future__ import annotations

import json
import shlex

import pandas as pd
import pytest
import yaml

from attnpipe.cli import main
from tests.conftest import REPO, write_project
from tests.e2e.test_readme_commands import OWN_IMAGES_COMMANDS, readme_commands
from tests.test_new_pipeline import CLASSES, SPLIT_SIZES, write_split_tree

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def _attnpipe(root, command: str, images) -> int:
    words = shlex.split(command.replace("/path/to/images", str(images)))
    assert words[:3] == ["uv", "run", "attnpipe"], command
    return main(["--root", str(root), *words[3:]])


def test_the_readme_block_builds_a_pipeline_from_split_folders(tmp_path, capsys):
    shown = readme_commands((REPO / "README.md").read_text())
    assert set(OWN_IMAGES_COMMANDS) <= set(shown), "the README's block changed: update the test"
    init, show, run, prepare = OWN_IMAGES_COMMANDS
    root = tmp_path / "project"
    root.mkdir()
    write_project(root)
    images = write_split_tree(tmp_path / "images")

    assert _attnpipe(root, init, images) == 0
    recipe_file = root / "pipelines/mine.yaml"
    recipe = yaml.safe_load(recipe_file.read_text())
    recipe["train"]["epochs"] = 1
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    capsys.readouterr()
    assert _attnpipe(root, show, images) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["epochs"] == 1
    assert _attnpipe(root, run, images) == 0

    manifest = pd.read_parquet(root / "data/mine/manifest.parquet")
    for split, count in SPLIT_SIZES.items():
        rows = manifest[manifest["split"] == split]
        # Every file of the split's folder, and nothing else, is in that split.
        assert len(rows) == count * len(CLASSES), (split, len(rows))
        assert {image_id.split("/")[0] for image_id in rows["id"]} == {split}
    classes = json.loads((root / "data/mine/classes.json").read_text())["classes"]
    assert classes == list(CLASSES), "the class folders"
    metrics = json.loads((root / "reports/mine/metrics.json").read_text())
    assert metrics["test"]["test_samples"] == SPLIT_SIZES["test"] * len(CLASSES)
    assert (root / "reports/mine/index.html").is_file()
    assert (root / "models/mine/model.onnx").is_file()

    # Another seed: --set reaches prepare (it says so), and the owner's splits stay as given.
    capsys.readouterr()
    assert _attnpipe(root, prepare, images) == 0
    assert "recipe changes for this run: {'prepare.seed': 1}" in capsys.readouterr().out
    again = pd.read_parquet(root / "data/mine/manifest.parquet")
    before = manifest.set_index("id")["split"].to_dict()
    assert again.set_index("id")["split"].to_dict() == before
