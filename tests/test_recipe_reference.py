"""docs/recipe.md is generated from the recipe schema, every key has a description, and a
resolved recipe (every default written out) reads back as the same recipe."""

from __future__ import annotations

import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from attnpipe.config import Recipe, available_pipelines, load_recipe, parse_recipe
from attnpipe.config.reference import main, recipe_reference, resolved_recipe_yaml

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "docs" / "recipe.md"
REGENERATE = "uv run python -m attnpipe.config.reference --write docs/recipe.md"


# Walked here, not with the generator's own walker, so that a key the generator misses fails.
def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The sections a field's type holds at any depth: unions, dict values, Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _schema(
    model: type[BaseModel], prefix: str = ""
) -> Iterator[tuple[str, type[BaseModel], FieldInfo]]:
    """(dotted path, section class, field) of every key, every source kind's included."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path, model, field
        # The entries of a mapping of sections (tune.space) are named `<key>` in the reference.
        inner = f"{path}.<key>." if typing.get_origin(field.annotation) is dict else f"{path}."
        for section in _models_in(field.annotation):
            yield from _schema(section, inner)


def test_docs_recipe_md_is_what_the_generator_writes_now():
    current = REFERENCE.read_text() if REFERENCE.is_file() else ""
    if current != recipe_reference():
        pytest.fail(
            f"docs/recipe.md is out of date with the recipe schema (src/attnpipe/config/): "
            f"regenerate it with `{REGENERATE}` and commit it",
            pytrace=False,
        )


def test_every_key_of_the_schema_is_in_docs_recipe_md():
    text = recipe_reference()
    paths = [path for path, _, _ in _schema(Recipe)]
    # Every source kind and a mapping's entries are walked, not only the plain sections.
    assert {
        "source.kind",
        "source.competition",
        "source.labels_csv",
        "tune.space.<key>.low",
    } <= set(paths)
    missing = [path for path in paths if f"| `{path}` |" not in text]
    assert not missing, f"not in the reference: {missing}"
    on_disk = REFERENCE.read_text()
    stale = [path for path in paths if f"| `{path}` |" not in on_disk]
    assert not stale, f"missing from docs/recipe.md: {stale}; regenerate it with `{REGENERATE}`"


def test_every_key_and_section_says_what_it_does():
    undescribed = sorted(
        {
            f"{model.__name__}.{path.rsplit('.', 1)[-1]} ({path})"
            for path, model, field in _schema(Recipe)
            if not (field.description or "").strip()
        }
    )
    assert not undescribed, (
        f"give these keys Field(description=...) (what it does, its unit, when to change it), "
        f"then regenerate docs/recipe.md with `{REGENERATE}`: {undescribed}"
    )
    sections = {model for _, model, _ in _schema(Recipe)}
    undocumented = sorted(m.__name__ for m in sections if not m.__dict__.get("__doc__"))
    assert not undocumented, f"give these sections a docstring: {undocumented}"


def test_reference_shows_types_defaults_and_constraints():
    text = recipe_reference()
    assert "| `train.ema_decay` | float in (0, 1) \\| null | `null` |" in text
    assert "| `train.epochs` | int >= 1 | `10` |" in text
    assert "| `shard.jpeg_quality` | int in [1, 100] | `90` |" in text
    assert "| `model.name` | str | required |" in text
    # YAML 1.1 reads 4:2:0 as a number and off as false: the reference shows them quoted.
    assert "`'4:2:0'`" in text and "`'off'`" in text
    assert "### source.kind: kaggle-competition" in text


@pytest.mark.parametrize("name", available_pipelines(REPO))
def test_resolved_recipe_reads_back_as_the_same_recipe(name):
    recipe = load_recipe(name, REPO)
    for comments in (True, False):
        text = resolved_recipe_yaml(recipe, comments=comments)
        assert parse_recipe(yaml.safe_load(text), name=name) == recipe


def test_resolved_recipe_writes_every_default_with_its_description():
    recipe = load_recipe("digits", REPO)
    written = yaml.safe_load((REPO / "pipelines" / "digits.yaml").read_text())
    assert "ema_decay" not in written["train"]
    text = resolved_recipe_yaml(recipe)
    data = yaml.safe_load(text)
    assert list(data) == [name for name in Recipe.model_fields if name != "name"]
    assert data["train"]["ema_decay"] is None
    assert data["train"]["optimizer"]["weight_decay"] == 0.0005  # the file's value wins
    assert data["train"]["loss"]["focal_gamma"] == 2.0
    assert "keep an exponential moving average of the weights" in text
    assert "  epochs: 15  # passes over the training split\n" in text
    assert max(len(line) for line in text.splitlines()) <= 100


def test_resolved_recipe_keeps_values_yaml_would_misread():
    data = yaml.safe_load((REPO / "pipelines" / "digits.yaml").read_text())
    data["shard"]["jpeg_subsampling"] = "4:4:4"
    data["train"].update(amp="off", workers=[1, 2], storage_path="s3://bucket/runs # not a comment")
    data["tune"] = {"space": {"train.optimizer.lr": {"type": "loguniform", "low": 1e-4, "high": 1}}}
    data["tune"]["space"]["augment.auto_augment"] = {"type": "grid", "values": ["none", "off"]}
    recipe = parse_recipe(data, name="digits")
    assert parse_recipe(yaml.safe_load(resolved_recipe_yaml(recipe)), name="digits") == recipe


def test_check_fails_on_a_stale_reference_and_names_the_command(tmp_path, capsys):
    path = tmp_path / "recipe.md"
    path.write_text(recipe_reference().replace("ema_decay", "ema"))
    assert main(["--check", str(path)]) == 1
    assert f"--write {path}" in capsys.readouterr().err
    assert main(["--write", str(path)]) == 0
    assert main(["--check", str(path)]) == 0
    assert path.read_text() == recipe_reference()
