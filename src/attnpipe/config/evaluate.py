"""`tracking` and `evaluate`: where runs are logged, and how the test split is scored."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from attnpipe.config.base import Strict


class WandbConfig(Strict):
    """Weights & Biases: where training, evaluation and sweeps log their runs."""

    mode: Literal["offline", "online", "disabled"] = Field(
        "offline",
        description="offline: runs are written locally (wandb sync uploads them later); online: "
        "logged live (needs WANDB_API_KEY or a ~/.netrc login, else offline); disabled: none",
    )
    project: str = Field("attnpipe", description="the W&B project the runs go to")
    entity: str | None = Field(
        None, description="the W&B team or user; null: the logged-in account's default"
    )


class TrackingConfig(Strict):
    """Where runs are logged."""

    wandb: WandbConfig = Field(WandbConfig(), description="Weights & Biases")


class EvaluateConfig(Strict):
    """How the test split is scored (and the model exported)."""

    batch_size: int = Field(
        128,
        ge=1,
        description="images per forward pass in evaluation, and in training's validation",
    )
    threshold: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="binary tasks: predict the positive class when its probability is at least "
        "this (also the exported model's rule); lower it to trade specificity for sensitivity",
    )
    flip_tta: bool = Field(
        False,
        description="average the probabilities of each image and its mirror (test-time "
        "augmentation; twice the compute)",
    )
    image_size: int | None = Field(
        None,
        ge=8,
        description="the side evaluation feeds the model; default model.input_size (the paper "
        "tests Attention-92 at 320 after training at 224: its pooling is global)",
    )
    crop_ratio: float = Field(
        1.0,
        gt=0,
        le=1,
        description="resize the shorter side to image_size / crop_ratio, then centre-crop "
        "image_size (0.875: ImageNet's resize-256 / crop-224 protocol; 1.0: resize to "
        "image_size and crop only the longer side)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where evaluate runs the model; auto: the GPU when there is one"
    )
    workers: int | Literal["auto"] = Field(
        "auto",
        description="with --address: Ray workers scoring the split; auto: as many as the alive "
        "nodes hold (never nodes started for it; none alive: train.workers when a number, "
        "else 1)",
    )
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs each evaluation worker reserves; null: train.cpus_per_worker"
    )
    gpus_per_worker: float | None = Field(
        None,
        ge=0,
        description="GPUs each evaluation worker reserves on GPUs; null: train.gpus_per_worker",
    )

    @field_validator("workers")
    @classmethod
    def _positive_workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("evaluate.workers must be auto or at least 1")
        return value
