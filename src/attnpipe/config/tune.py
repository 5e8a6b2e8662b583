"""`tune`: a Ray Tune sweep over recipe keys."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from attnpipe.config.base import Strict
from attnpipe.config.train import Monitor, check_gpus_per_worker


class SearchDimension(Strict):
    """One hyperparameter's range: `loguniform`/`uniform` over [low, high], `choice` (random
    pick) or `grid` (every value, each `num_samples` times)."""

    type: Literal["loguniform", "uniform", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

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

    space: dict[str, SearchDimension] = Field(default_factory=dict)
    num_samples: int = Field(8, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    metric: Monitor = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    epochs: int | None = Field(None, ge=1, description="per trial; default train.epochs")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs before a trial can be stopped")
    reduction_factor: int = Field(2, ge=2)
    workers_per_trial: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, ge=0, description="used only when training on GPUs")
    seed: int = 0

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
