"""Typed recipes: `pipelines/<name>.yaml` validated into objects at the edge.

Every stage reads its settings from a `Recipe`. Unknown keys, wrong types and unknown
pipeline names fail here with one line that names the key path and the valid choices, so
a typo never silently falls back to a default.

One module per recipe section (`sources`, `data`, `model`, `train`, `evaluate`, `tune`);
`recipe` composes them and loads a file. Their field descriptions are the reference
(`docs/recipe.md` is generated from them by `attnpipe.config.reference`, which is not
re-exported here: every stage imports this package, and the doc generator must not become
part of the code a stage's result depends on, see `attnpipe.codeversion`).
"""

from attnpipe.config.base import ConfigError, Strict
from attnpipe.config.data import PrepareConfig, ShardConfig, SplitRatios
from attnpipe.config.evaluate import EvaluateConfig, TrackingConfig, WandbConfig
from attnpipe.config.model import AugmentConfig, ModelConfig
from attnpipe.config.recipe import (
    Recipe,
    apply_overrides,
    available_pipelines,
    format_validation_error,
    load_overrides,
    load_recipe,
    parse_assignments,
    parse_recipe,
    pipeline_path,
    resolve_pretrained,
)
from attnpipe.config.sources import (
    SOURCE_CONFIGS,
    FolderSource,
    KaggleCompetitionSource,
    KaggleDatasetSource,
    SklearnDigitsSource,
    Source,
    TorchvisionSource,
)
from attnpipe.config.train import (
    LossConfig,
    Monitor,
    OptimizerConfig,
    ScheduleConfig,
    TrainConfig,
    Workers,
    check_gpus_per_worker,
    check_workers,
    checkpoint_interval,
)
from attnpipe.config.tune import SearchDimension, TuneConfig

__all__ = [
    "SOURCE_CONFIGS",
    "AugmentConfig",
    "ConfigError",
    "EvaluateConfig",
    "FolderSource",
    "KaggleCompetitionSource",
    "KaggleDatasetSource",
    "LossConfig",
    "ModelConfig",
    "Monitor",
    "OptimizerConfig",
    "PrepareConfig",
    "Recipe",
    "ScheduleConfig",
    "SearchDimension",
    "ShardConfig",
    "SklearnDigitsSource",
    "Source",
    "SplitRatios",
    "Strict",
    "TorchvisionSource",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "WandbConfig",
    "Workers",
    "apply_overrides",
    "available_pipelines",
    "check_gpus_per_worker",
    "check_workers",
    "checkpoint_interval",
    "format_validation_error",
    "load_overrides",
    "load_recipe",
    "parse_assignments",
    "parse_recipe",
    "pipeline_path",
    "resolve_pretrained",
]
