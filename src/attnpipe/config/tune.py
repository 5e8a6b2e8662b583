"""`tune`: a Ray Tune sweep over recipe keys."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from attnpipe.config.base import Strict
from attnpipe.config.train import Monitor, check_gpus_per_worker


class SearchDimension(Strict):
    """One hyperparameter's range: `loguniform`/`uniform` over [low, high], `choice` (random
    pick) or `grid` (every value, each `num_samples` times)."""

    type: Literal["loguniform", "uniform", "choice", "grid"] = Field(
        description="loguniform (rates, decays: low > 0) or uniform: sampled in [low, high]; "
        "choice: one of values at random; grid: every value"
    )
    low: float | None = Field(None, description="loguniform/uniform: the lower bound")
    high: float | None = Field(None, description="loguniform/uniform: the upper bound")
    values: list[Any] | None = Field(
        None, description="choice/grid: the values to pick from (any recipe value: YAML)"
    )

    @model_validator(mode="after")
    def _complete(self) -> SearchDimension:
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"a '{self.type}' dimension needs a non-empty 'values' list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a '{self.type}' dimension needs 'low' < 'high'")
        elif self.type == "loguniform" and self.low <= 0:
            raise ValueError("a 'loguniform' dimension needs 'low' > 0")
        return self


class TuneConfig(Strict):
    """A Ray Tune sweep over recipe keys (dotted paths such as `train.optimizer.lr`)."""

    space: dict[str, SearchDimension] = Field(
        default_factory=dict,
        description="the keys to search, dotted recipe keys (e.g. train.optimizer.lr), each "
        "with its range; `attnpipe tune` needs at least one",
    )
    num_samples: int = Field(
        8,
        ge=1,
        description="trials sampled from the space; with grid dimensions, each grid point this "
        "many times",
    )
    max_concurrent_trials: int = Field(
        2, ge=1, description="trials running at once; raise it as far as the cluster fits"
    )
    metric: Monitor = Field(
        "val_accuracy",
        description="the validation metric trials are compared and stopped on (each trial's "
        "train.monitor)",
    )
    mode: Literal["max", "min"] = Field(
        "max", description="whether metric is better higher (max) or lower (min: val_loss)"
    )
    epochs: int | None = Field(
        None, ge=1, description="epochs of a trial that is not stopped; null: train.epochs"
    )
    grace_period: int = Field(
        1, ge=1, description="ASHA: epochs every trial trains before it can be stopped"
    )
    reduction_factor: int = Field(
        2,
        ge=2,
        description="ASHA: at each rung only the best 1/reduction_factor of the trials go on",
    )
    workers_per_trial: int = Field(1, ge=1, description="Ray Train workers (ranks) per trial")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs each trial's rank reserves")
    gpus_per_worker: float = Field(
        1,
        ge=0,
        description="GPUs each trial's rank reserves when training on GPUs; a fraction (e.g. "
        "0.5) puts several one-rank trials on one GPU",
    )
    seed: int = Field(0, description="seeds the sampling of the space (not the training)")

    @model_validator(mode="after")
    def _whole_gpus_per_rank(self) -> TuneConfig:
        check_gpus_per_worker(
            self.gpus_per_worker,
            self.workers_per_trial,
            "tune.gpus_per_worker",
            "tune.workers_per_trial",
            "the GPUs each trial should use",
        )
        return self
