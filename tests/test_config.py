"""Recipes are validated at the edge: every mistake is one line naming the key and choices."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from attnpipe.cli import main
from attnpipe.config import ConfigError, apply_overrides, load_recipe, parse_recipe
from tests.conftest import REPO, write_project


def _recipe_data() -> dict:
    return yaml.safe_load((REPO / "pipelines" / "digits.yaml").read_text())


def test_repository_recipes_all_load():
    for path in sorted((REPO / "pipelines").glob("*.yaml")):
        recipe = load_recipe(path.stem, REPO)
        assert recipe.name == path.stem


def test_misspelled_key_is_one_line_naming_valid_keys():
    data = _recipe_data()
    data["train"]["epoch"] = data["train"].pop("epochs")
    with pytest.raises(ConfigError) as caught:
        parse_recipe(data, name="digits", origin="pipelines/digits.yaml")
    message = str(caught.value)
    assert "\n" not in message
    assert "unknown key 'train.epoch'" in message
    assert "epochs" in message  # the valid spelling is offered
    assert message.startswith("pipelines/digits.yaml")


def test_misspelled_key_inside_a_source_names_that_sources_keys():
    data = _recipe_data()
    data["source"]["image_sise"] = 32
    with pytest.raises(
        ConfigError, match=r"unknown key 'source.image_sise' \(valid keys: image_size, kind\)"
    ):
        parse_recipe(data, name="digits")


def test_wrong_type_names_the_key():
    data = _recipe_data()
    data["train"]["batch_size"] = "many"
    with pytest.raises(ConfigError, match=r"'train.batch_size'.*integer"):
        parse_recipe(data, name="digits")


def test_unknown_source_kind_lists_the_kinds():
    data = _recipe_data()
    data["source"] = {"kind": "ftp"}
    with pytest.raises(ConfigError, match="sklearn-digits") as caught:
        parse_recipe(data, name="digits")
    assert "kaggle-competition" in str(caught.value)


def test_split_ratios_must_sum_to_one():
    data = _recipe_data()
    data["prepare"]["splits"] = {"train": 0.5, "val": 0.1, "test": 0.1}
    with pytest.raises(ConfigError, match="sum to 1"):
        parse_recipe(data, name="digits")


def test_unknown_pipeline_names_the_valid_ones():
    with pytest.raises(ConfigError) as caught:
        load_recipe("digts", REPO)
    message = str(caught.value)
    assert "unknown pipeline 'digts'" in message and "digits" in message
    assert "\n" not in message


def test_unknown_model_names_the_registry():
    data = _recipe_data()
    data["model"]["name"] = "attention57"
    with pytest.raises(ConfigError) as caught:
        parse_recipe(data, name="digits")
    message = str(caught.value)
    assert "unknown model 'attention57'" in message
    assert "attention56" in message and "resnet50" in message
    assert "\n" not in message


def test_overrides_merge_and_are_validated():
    recipe = load_recipe("digits", REPO)
    changed = apply_overrides(recipe, {"train.optimizer.lr": 0.01}, origin="best_params.yaml")
    assert changed.train.optimizer.lr == 0.01
    assert changed.train.epochs == recipe.train.epochs
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lr'"):
        apply_overrides(recipe, {"train.lr": 0.01}, origin="best_params.yaml")


def test_fingerprint_follows_the_named_sections():
    recipe = load_recipe("digits", REPO)
    other_eval = apply_overrides(recipe, {"evaluate.batch_size": 7}, origin="test")
    other_train = apply_overrides(recipe, {"train.epochs": 3}, origin="test")
    assert recipe.fingerprint("train") == other_eval.fingerprint("train")
    assert recipe.fingerprint("train") != other_train.fingerprint("train")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["train"].update(epoch=3), "unknown key 'train.epoch'"),
        (lambda d: d["model"].update(name="resnet5O"), "unknown model 'resnet5O'"),
    ],
)
def test_cli_reports_config_errors_in_one_line(tmp_path: Path, capsys, edit, expected):
    root = write_project(tmp_path)
    path = root / "pipelines" / "digits.yaml"
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data))
    code = main(["--root", str(root), "prepare", "digits"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("attnpipe: error:") and expected in err
    assert len(err.splitlines()) == 1  # no traceback wall


def test_cli_unknown_pipeline(tmp_path: Path, capsys):
    root = write_project(tmp_path)
    assert main(["--root", str(root), "fetch", "cifar11"]) == 1
    err = capsys.readouterr().err.strip()
    assert "unknown pipeline 'cifar11'" in err and "digits" in err
    assert len(err.splitlines()) == 1
