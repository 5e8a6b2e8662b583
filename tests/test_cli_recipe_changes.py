"""Every command that reads a recipe takes --set and --overrides, and applies them first."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from attnpipe.cli import main
from attnpipe.config import parse_recipe
from tests.conftest import write_project

RECIPE_COMMANDS = [
    ["fetch"],
    ["prepare"],
    ["shard"],
    ["train"],
    ["evaluate"],
    ["export"],
    ["tune"],
    ["run"],
    ["config", "show"],
    ["plan"],
]


@pytest.mark.parametrize("command", RECIPE_COMMANDS, ids=" ".join)
def test_every_recipe_command_checks_its_changes_before_any_work(tmp_path, capsys, command):
    """A wrong key fails at once, named: the change reached the recipe before any stage ran
    (a command without --set would stop at argparse with exit status 2 instead)."""
    root = write_project(tmp_path)
    code = main(["--root", str(root), *command, "digits", "--set", "prepare.splits.vall=0.2"])
    assert code == 1
    error = capsys.readouterr().err
    assert "unknown key 'prepare.splits.vall'" in error and "val" in error
    assert not (root / "data").exists(), "nothing was fetched or written"


@pytest.mark.parametrize("command", RECIPE_COMMANDS, ids=" ".join)
def test_every_recipe_command_reads_an_overrides_file(tmp_path, capsys, command):
    root = write_project(tmp_path)
    overrides = tmp_path / "changes.yaml"
    overrides.write_text("train.optimizer.momentum: 2.0\n")
    code = main(["--root", str(root), *command, "digits", "--overrides", str(overrides)])
    assert code == 1
    assert "'train.optimizer.momentum'" in capsys.readouterr().err


def test_prepare_with_set_splits_by_the_changed_fractions(tmp_path, capsys):
    root = write_project(tmp_path)
    assert main(["--root", str(root), "fetch", "digits", "--no-progress"]) == 0
    changes = ["--set", "prepare.splits={train: 0.5, val: 0.25, test: 0.25}"]
    assert main(["--root", str(root), "prepare", "digits", "--no-progress", *changes]) == 0
    manifest = pd.read_parquet(root / "data/digits/manifest.parquet")
    counts = manifest["split"].value_counts().to_dict()
    total = sum(counts.values())
    assert abs(counts["val"] / total - 0.25) < 0.02, counts
    assert abs(counts["train"] / total - 0.5) < 0.02, counts
    # The recipe file itself is unchanged: --set is for this command only.
    recipe = yaml.safe_load((root / "pipelines/digits.yaml").read_text())
    assert recipe["prepare"]["splits"]["val"] != 0.25


def test_config_show_prints_the_resolved_recipe_with_the_changes(tmp_path, capsys):
    root = write_project(tmp_path)
    code = main(["--root", str(root), "config", "show", "digits", "--set", "train.epochs=3"])
    assert code == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["epochs"] == 3
    assert shown["train"]["ema_decay"] is None  # a default the file does not spell out
    assert shown["model"]["name"] == "attention56_cifar"
    parse_recipe(shown, name="digits")  # and it is a recipe
