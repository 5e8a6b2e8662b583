"""`train`: the optimizer, schedule and loss, and how the Ray Train run executes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from attnpipe.config.base import Strict


class OptimizerConfig(Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0, description="the rate at reference_batch (see scale_lr)")
    scale_lr: Literal["none", "linear", "sqrt"] = Field(
        "none",
        description="how the rate follows the global batch (workers x batch_size x "
        "accumulate_steps): none keeps lr; linear multiplies it by global/reference_batch; sqrt "
        "by the square root of that. One recipe then trains alike on 2 or 16 GPUs",
    )
    reference_batch: int = Field(256, ge=1, description="the global batch that lr is given for")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(1e-4, ge=0)


class ScheduleConfig(Strict):
    name: Literal["cosine", "multistep", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    milestones: tuple[float, ...] = Field(
        (0.3, 0.6, 0.9), description="multistep: fractions of training where lr is divided"
    )
    gamma: float = Field(0.1, gt=0)


class LossConfig(Strict):
    name: Literal["cross_entropy", "focal"] = "cross_entropy"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    focal_gamma: float = Field(2.0, ge=0)
    class_weights: Literal["none", "inverse_frequency"] = "none"


Monitor = Literal[
    "val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_loss", "val_roc_auc"
]


Workers = int | Literal["auto"] | tuple[int, int]


def check_workers(value: Any) -> Any:
    """`train.workers`: a number >= 1, `auto`, or an elastic range [min, max] with 1 <= min <=
    max. Checked before pydantic's union, whose three-way error would not say what fits."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    if isinstance(value, list | tuple) and len(value) == 2:
        low, high = value
        whole = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if whole and 1 <= low <= high:
            return (low, high)
    raise ValueError(
        f"expected a number of workers >= 1, auto (one per GPU, or per node without GPUs) "
        f"or an elastic range [min, max] with 1 <= min <= max, got {value!r}"
    )


def check_gpus_per_worker(
    gpus: float, workers: Any, key: str, workers_key: str, count: str
) -> None:
    """Several DDP ranks on one GPU fail in NCCL ("Duplicate GPU detected"): a fraction of a
    GPU is only for a single rank (e.g. tune trials sharing a GPU, one rank each)."""
    if 0 < gpus < 1 and workers != 1:
        raise ValueError(
            f"{key}: {gpus:g} would put several DDP ranks on one GPU, which NCCL refuses "
            f'("Duplicate GPU detected"): keep {key}: 1 and set {workers_key} to {count}, '
            f"or use a fraction only with {workers_key}: 1"
        )
    if gpus > 1 and gpus != int(gpus):
        raise ValueError(f"{key}: a rank uses whole GPUs above 1, got {gpus:g}")


class TrainConfig(Strict):
    workers: Workers = Field(
        2,
        description="Ray Train workers (DDP ranks): a number; auto: one per GPU the cluster has "
        "or its autoscaler can add (one per node without GPUs); [min, max]: elastic, the run "
        "goes on with fewer ranks (down to min) when nodes leave and grows back up to max",
    )
    use_gpu: Literal["auto", True, False] = "auto"
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, ge=0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1, description="per worker")
    loader_workers: int = Field(0, ge=0, description="DataLoader processes per worker")
    shuffle_buffer: int = Field(1000, ge=1)
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    loss: LossConfig = LossConfig()
    grad_clip_norm: float | None = Field(None, gt=0)
    accumulate_steps: int = Field(1, ge=1)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto", True, False] = Field(
        "auto",
        description="NHWC memory layout; auto: on GPUs (tensor cores want it), off on CPUs "
        "(slower there, docs/benchmarks.md)",
    )
    compile: bool = False
    deterministic: bool = Field(
        False,
        description="repeatable runs: cuDNN deterministic, benchmark off, deterministic "
        "algorithms only, cuBLAS workspace setting, seeded loader workers (slower on GPUs)",
    )
    sync_batchnorm: bool = Field(
        False,
        description="BatchNorm statistics over the global batch (SyncBatchNorm; GPUs only): "
        "for small per-GPU batches",
    )
    ema_decay: float | None = Field(None, gt=0, lt=1)
    early_stopping_patience: int | None = Field(None, ge=1)
    monitor: Monitor = "val_accuracy"
    max_failures: int = Field(2, ge=-1, description="worker-group restarts; -1 = unlimited")
    storage_path: str | None = Field(
        None,
        description="checkpoints: a folder or URL (s3://...); default models/<name>/checkpoints",
    )
    checkpoints_to_keep: int = Field(2, ge=1)
    seed: int = 0

    @field_validator("workers", mode="before")
    @classmethod
    def _workers_shape(cls, value: Any) -> Any:
        return check_workers(value)

    @model_validator(mode="after")
    def _whole_gpus_per_rank(self) -> TrainConfig:
        check_gpus_per_worker(
            self.gpus_per_worker,
            self.workers,
            "train.gpus_per_worker",
            "train.workers",
            "the number of GPUs (or auto: one rank per GPU)",
        )
        return self
