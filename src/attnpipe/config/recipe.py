"""A whole recipe, and loading it: `pipelines/<name>.yaml` validated, with changes applied."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError, model_validator

from attnpipe.config.base import ConfigError, Strict
from attnpipe.config.data import PrepareConfig, ShardConfig
from attnpipe.config.evaluate import EvaluateConfig, TrackingConfig
from attnpipe.config.model import AugmentConfig, ModelConfig
from attnpipe.config.sources import SOURCE_CONFIGS, Source
from attnpipe.config.train import TrainConfig
from attnpipe.config.tune import TuneConfig


class Recipe(Strict):
    """One pipeline's whole recipe, as in `pipelines/<name>.yaml`."""

    name: str
    source: Source
    prepare: PrepareConfig = PrepareConfig()
    shard: ShardConfig = ShardConfig()
    model: ModelConfig
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tune: TuneConfig = TuneConfig()

    @model_validator(mode="after")
    def _space_names_recipe_keys(self) -> Recipe:
        data = self.model_dump()
        for dotted in self.tune.space:
            node: Any = data
            for part in dotted.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise ValueError(f"tune.space: '{dotted}' is not a key of the recipe")
                node = node[part]
        return self

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of the named sections (all when none): identifies a training run."""
        data = self.model_dump(mode="json")
        if sections:
            data = {key: data[key] for key in sections}
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# --------------------------------------------------------------------------- loading
def _valid_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at `loc` (the parent of an unknown key)."""
    current: Any = model
    for part in loc:
        if part in SOURCE_CONFIGS:  # pydantic puts the union member's tag in the path
            current = SOURCE_CONFIGS[part]
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return []
        annotation = fields[part].annotation
        current = annotation if isinstance(annotation, type) else None
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else []


def format_validation_error(error: ValidationError, model: type[BaseModel], origin: str) -> str:
    """Render pydantic's errors as one line naming each key path and what is allowed."""
    parts = []
    for item in error.errors():
        loc = tuple(item["loc"])
        # Union members appear in loc as their tag (e.g. 'sklearn-digits'): not a user key.
        path = ".".join(str(p) for p in loc if p not in SOURCE_CONFIGS) or "<root>"
        if item["type"] == "extra_forbidden":
            valid = _valid_keys(model, loc[:-1])
            hint = f" (valid keys: {', '.join(valid)})" if valid else ""
            parts.append(f"unknown key '{path}'{hint}")
        elif item["type"] == "union_tag_invalid":
            parts.append(f"{path}: {item['msg']}")
        else:
            parts.append(f"'{path}': {item['msg']}")
    return f"{origin}: " + "; ".join(parts)


def pipeline_path(name: str, root: Path) -> Path:
    return root / "pipelines" / f"{name}.yaml"


def available_pipelines(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "pipelines").glob("*.yaml"))


def load_recipe(name: str, root: Path | str = ".") -> Recipe:
    """Load and validate `pipelines/<name>.yaml` under `root`."""
    root = Path(root)
    path = pipeline_path(name, root)
    if not path.is_file():
        choices = ", ".join(available_pipelines(root)) or "none found"
        raise ConfigError(f"unknown pipeline '{name}': no {path}; choose one of: {choices}")
    return parse_recipe(yaml.safe_load(path.read_text()) or {}, name=name, origin=str(path))


def parse_recipe(data: dict[str, Any], name: str, origin: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level")
    data = {"name": name, **data}
    if data["name"] != name:
        raise ConfigError(f"{origin}: 'name' is {data['name']!r} but the file is for {name!r}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, Recipe, origin)) from None
    _check_model_section(recipe, origin)
    return recipe


def _check_model_section(recipe: Recipe, origin: str) -> None:
    """`model.name`, every key of `model.kwargs` and `model.pretrained` against the registry:
    a typo fails here, naming its key path, not later inside the training workers."""
    from attnpipe.models import ModelError, check_pretrained, list_models, model_kwargs

    model = recipe.model
    if model.name not in list_models():
        raise ConfigError(
            f"{origin}: unknown model '{model.name}' in 'model.name'; "
            f"choose one of: {', '.join(list_models())}"
        )
    valid = model_kwargs(model.name)
    unknown = sorted(set(model.kwargs) - set(valid))
    if unknown:
        keys = ", ".join(f"'model.kwargs.{key}'" for key in unknown)
        allowed = ", ".join(f"{k} (default {v!r})" for k, v in valid.items()) or "none"
        raise ConfigError(
            f"{origin}: unknown key {keys} for model '{model.name}' (valid keys: {allowed})"
        )
    try:
        check_pretrained(model.name, model.pretrained)
    except ModelError as error:
        raise ConfigError(f"{origin}: 'model.pretrained': {error}") from None


def parse_assignments(assignments: list[str], origin: str = "--set") -> dict[str, Any]:
    """`KEY=VALUE` strings (dotted recipe keys) -> {key: value}, values read as YAML scalars.

    As `dvc exp run -S`: `train.epochs=3` is an int, `train.compile=true` a bool,
    `model.kwargs={width_multiplier: 0.5}` a mapping, `train.storage_path=s3://b/c` a string.
    """
    parsed: dict[str, Any] = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"{origin} {item!r}: expected KEY=VALUE with a dotted recipe key, "
                "e.g. --set train.epochs=3"
            )
        try:
            parsed[key] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as error:
            reason = " ".join(str(error).split())
            raise ConfigError(f"{origin} {item!r}: not a valid YAML value ({reason})") from None
    return parsed


def load_overrides(path: Path) -> dict[str, Any]:
    """Read an overrides file such as a sweep's best_params.yaml (dotted recipe keys -> values)."""
    if not path.is_file():
        raise ConfigError(f"{path} is missing: run `attnpipe tune` first, or fix the path")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of recipe keys to values")
    return data


def apply_overrides(recipe: Recipe, overrides: dict[str, Any], origin: str) -> Recipe:
    """Deep-merge dotted-key overrides (e.g. from a sweep's best_params.yaml) and re-validate."""
    data = recipe.model_dump(mode="json")
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{origin}: override '{dotted}' does not name a recipe section")
            node = node[part]
        node[leaf] = value
    return parse_recipe(data, name=recipe.name, origin=origin)
