"""A whole recipe, and loading it: `pipelines/<name>.yaml` validated, with changes applied."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from attnpipe.config.base import ConfigError, Strict
from attnpipe.config.data import PrepareConfig, ShardConfig
from attnpipe.config.evaluate import EvaluateConfig, TrackingConfig
from attnpipe.config.model import AugmentConfig, ModelConfig
from attnpipe.config.sources import SOURCE_CONFIGS, Source
from attnpipe.config.train import TrainConfig
from attnpipe.config.tune import TuneConfig


class Recipe(Strict):
    """One pipeline's whole recipe, as in `pipelines/<name>.yaml`."""

    name: str = Field(
        description="the pipeline's name: set from the file name (pipelines/<name>.yaml); "
        "names its data/, models/ and reports/ folders"
    )
    source: Source = Field(description="where the images come from; `kind` picks the type")
    prepare: PrepareConfig = Field(
        PrepareConfig(), description="validation, de-duplication and the train/val/test split"
    )
    shard: ShardConfig = Field(ShardConfig(), description="the WebDataset shards training reads")
    model: ModelConfig = Field(description="the network")
    augment: AugmentConfig = Field(AugmentConfig(), description="train-time augmentation")
    train: TrainConfig = Field(TrainConfig(), description="the training run")
    tracking: TrackingConfig = Field(TrackingConfig(), description="experiment tracking")
    evaluate: EvaluateConfig = Field(EvaluateConfig(), description="scoring the test split")
    tune: TuneConfig = Field(TuneConfig(), description="a hyperparameter sweep (`attnpipe tune`)")

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
        """Stable hash of the named sections (all when none)."""
        data = self.model_dump(mode="json")
        if sections:
            data = {key: data[key] for key in sections}
        return _digest(data)

    def weights_fingerprint(self) -> str:
        """Stable hash of what shapes the trained weights: the model, augmentation and training
        settings less those that only say how the run executes (`TrainConfig.EXECUTION_KEYS`),
        so that changing those resumes a run instead of starting it again."""
        data = self.model_dump(mode="json", include={"model", "augment", "train"})
        for key in TrainConfig.EXECUTION_KEYS:
            data["train"].pop(key)
        return _digest(data)


def _digest(data: dict[str, Any]) -> str:
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
    data = yaml.safe_load(path.read_text()) or {}
    return parse_recipe(data, name=name, origin=str(path), root=root)


def parse_recipe(
    data: dict[str, Any], name: str, origin: str = "<recipe>", root: Path | None = None
) -> Recipe:
    """Validate a recipe mapping. With the project `root`, a relative `model.pretrained` file
    is checked too (an absolute one always is); without it, that waits for `resolve_pretrained`.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level")
    data = {"name": name, **data}
    if data["name"] != name:
        raise ConfigError(f"{origin}: 'name' is {data['name']!r} but the file is for {name!r}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, Recipe, origin)) from None
    _check_model_section(recipe, origin, root)
    return recipe


def _check_model_section(recipe: Recipe, origin: str, root: Path | None) -> None:
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
    path = model.pretrained_file(root)
    if path is not None:
        _check_pretrained_file(recipe, path, origin)


def _check_pretrained_file(recipe: Recipe, path: Path, origin: str) -> None:
    """The file exists, is readable and, for a model.pt, has the recipe's architecture."""
    from attnpipe.models import ModelError, check_pretrained_file

    if not path.is_file():
        raise ConfigError(
            f"{origin}: 'model.pretrained': {path} does not exist (a relative path is taken "
            "from the project root): train the pipeline that writes it first "
            "(`attnpipe train <name>` writes models/<name>/model.pt), or fix the path"
        )
    try:
        check_pretrained_file(recipe.model.name, path, recipe.model.kwargs)
    except ModelError as error:
        raise ConfigError(f"{origin}: 'model.pretrained': {error}") from None


def resolve_pretrained(recipe: Recipe, root: Path, origin: str = "<recipe>") -> Recipe:
    """`recipe` with a relative `model.pretrained` made absolute under the project `root`, and
    the file checked: training workers run in other folders (Ray's trial directories).

    The recipe as written keeps the relative path, so run names (its fingerprint) do not depend
    on where the project lives, e.g. in DVC's temporary copy of an experiment."""
    path = recipe.model.pretrained_file(root)
    if path is None:
        return recipe
    path = path.resolve()
    _check_pretrained_file(recipe, path, origin)
    model = recipe.model.model_copy(update={"pretrained": str(path)})
    return recipe.model_copy(update={"model": model})


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
