"""`train`: the optimizer, schedule and loss, and how the Ray Train run executes."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from attnpipe.config.base import Strict


class OptimizerConfig(Strict):
    """The optimizer and its base learning rate."""

    name: Literal["sgd", "adamw"] = Field(
        "sgd",
        description="sgd (with momentum; lr around 0.1 at batch 256) or adamw (torch's default "
        "betas; lr around 1e-3)",
    )
    lr: float = Field(
        0.1,
        gt=0,
        description="the peak learning rate (after warmup) at reference_batch (see scale_lr)",
    )
    scale_lr: Literal["none", "linear", "sqrt"] = Field(
        "none",
        description="how the rate follows the global batch (workers x batch_size x "
        "accumulate_steps): none keeps lr; linear multiplies it by global/reference_batch; sqrt "
        "by the square root of that. One recipe then trains alike on 2 or 16 GPUs",
    )
    reference_batch: int = Field(256, ge=1, description="the global batch that lr is given for")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only: the momentum factor")
    nesterov: bool = Field(True, description="sgd only: Nesterov momentum")
    weight_decay: float = Field(
        1e-4,
        ge=0,
        description="L2 penalty (sgd) or decoupled decay (adamw) on weights; never on norms and "
        "biases; raise it (5e-4) for small datasets, 0.05 is usual with adamw",
    )


class ScheduleConfig(Strict):
    """How the learning rate changes over training, per optimizer step."""

    name: Literal["cosine", "multistep", "constant"] = Field(
        "cosine",
        description="after warmup: cosine decays lr to 0 at the end; multistep multiplies it "
        "by gamma at each milestone; constant keeps it",
    )
    warmup_epochs: float = Field(
        0.0,
        ge=0,
        description="epochs (fractions allowed) over which lr rises linearly from near 0; "
        "1-5 for large batches or from-scratch training",
    )
    milestones: tuple[float, ...] = Field(
        (0.3, 0.6, 0.9),
        description="multistep: fractions of all training steps at which lr is multiplied by gamma",
    )
    gamma: float = Field(0.1, gt=0, description="multistep: the factor at each milestone")


class LossConfig(Strict):
    """The training loss."""

    name: Literal["cross_entropy", "focal"] = Field(
        "cross_entropy",
        description="cross_entropy, or focal (cross-entropy scaled by (1 - p_true)^focal_gamma: "
        "less weight on easy examples, for strong class imbalance)",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="cross_entropy only: the share of each target spread over all classes "
        "(0.1 is usual); 0: off",
    )
    focal_gamma: float = Field(
        2.0, ge=0, description="focal only: the focusing exponent; 0 is plain cross-entropy"
    )
    class_weights: Literal["none", "inverse_frequency"] = Field(
        "none",
        description="inverse_frequency: weight each class's loss by 1 / (classes x its share "
        "of the training split), 1 for all when balanced: for imbalanced classes",
    )


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


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}


def check_checkpoint_every(value: Any) -> Any:
    """`train.checkpoint_every`: null, a number of optimizer steps >= 1, or a duration such as
    90s, 15m or 1.5h (a positive number and s, m or h)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str):
        if value.strip().isdigit() and int(value) >= 1:
            return int(value)
        match = _DURATION.match(value)
        if match and float(match.group(1)) > 0:
            return f"{match.group(1)}{match.group(2)}"
    raise ValueError(
        f"expected null, a number of optimizer steps >= 1 or a duration such as 90s, 15m or "
        f"1.5h, got {value!r}"
    )


def checkpoint_interval(value: int | str | None) -> tuple[int | None, float | None]:
    """(optimizer steps, seconds) between mid-epoch checkpoints of `train.checkpoint_every`:
    one of them or neither."""
    if value is None:
        return None, None
    if isinstance(value, int):
        return value, None
    match = _DURATION.match(value)
    if match is None:
        raise ValueError(f"train.checkpoint_every: {value!r} is not a duration")
    return None, float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


class TrainConfig(Strict):
    """How the model trains, and how the Ray Train run executes."""

    # How a run executes, not what it computes: a run's identity leaves them out, so changing
    # one resumes the run from its checkpoints (more loader processes after a slow first
    # epoch, a larger failure budget after a crash, another bucket). Every other key of
    # model, augment and train shapes the weights and starts a new run.
    EXECUTION_KEYS: ClassVar[tuple[str, ...]] = (
        "loader_workers",
        "cpus_per_worker",
        "max_failures",
        "storage_path",
        "checkpoints_to_keep",
        "checkpoint_every",
    )

    workers: Workers = Field(
        2,
        description="Ray Train workers (DDP ranks): a number; auto: the whole ranks each node "
        "holds (its GPUs and CPUs) over the nodes alive or the autoscaler may add (one per "
        "node without GPUs; `attnpipe plan` shows them); [min, max]: elastic, the run goes on "
        "with fewer ranks (down to min) when nodes leave and grows back up to max",
    )
    use_gpu: Literal["auto", True, False] = Field(
        "auto",
        description="train on GPUs; auto: when the cluster has GPUs or can add them; true fails "
        "where there are none",
    )
    cpus_per_worker: float = Field(
        1,
        gt=0,
        description="CPUs Ray reserves for each rank (also its torch threads); add loader_workers "
        "to it when they are used",
    )
    gpus_per_worker: float = Field(
        1,
        ge=0,
        description="GPUs per rank when training on GPUs: whole GPUs, or a fraction only with "
        "workers: 1 (NCCL refuses two ranks on one GPU)",
    )
    epochs: int = Field(10, ge=1, description="passes over the training split")
    batch_size: int = Field(
        64,
        ge=1,
        description="images per rank per step; the global batch is workers x batch_size x "
        "accumulate_steps",
    )
    loader_workers: int = Field(
        0,
        ge=0,
        description="DataLoader processes per rank that read, decode and augment images; 0: in "
        "the training process; raise it (4-8 per GPU) when the GPU waits for data",
    )
    shuffle_buffer: int = Field(
        1000,
        ge=1,
        description="samples each reader (rank x loader worker) holds to shuffle its stream, on "
        "top of a shuffled shard order: larger mixes better but costs memory and start time",
    )
    optimizer: OptimizerConfig = Field(OptimizerConfig(), description="the optimizer")
    schedule: ScheduleConfig = Field(ScheduleConfig(), description="the learning-rate schedule")
    loss: LossConfig = Field(LossConfig(), description="the loss")
    grad_clip_norm: float | None = Field(
        None,
        gt=0,
        description="clip the gradients' total L2 norm to this before each optimizer step "
        "(e.g. 1.0-5.0, against loss spikes); null: no clipping",
    )
    accumulate_steps: int = Field(
        1,
        ge=1,
        description="batches whose gradients add up to one optimizer step: a larger global "
        "batch than memory allows",
    )
    rewarm_steps: int = Field(
        100,
        ge=0,
        description="elastic runs with scale_lr: when a resume finds more ranks than the "
        "last epoch had (e.g. 8 -> 16), the scaled learning rate rises linearly from the old "
        "rate to the new one over this many optimizer steps instead of at once; 0: off",
    )
    amp: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto",
        description="mixed precision; auto: bf16 on GPUs that have it natively (compute "
        "capability 8.0+), fp16 with gradient scaling on older ones, off (float32) on CPUs",
    )
    channels_last: Literal["auto", True, False] = Field(
        "auto",
        description="NHWC memory layout; auto: on GPUs (tensor cores want it), off on CPUs "
        "(slower there, docs/benchmarks.md)",
    )
    compile: bool = Field(
        False,
        description="torch.compile the model: faster steps on GPUs after a slow first epoch",
    )
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
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="keep an exponential moving average of the weights (and BatchNorm "
        "statistics), validated, chosen as best and saved instead of them. The decay is per "
        "optimizer.reference_batch images: each optimizer step (global batch B) does ema = d x "
        "ema + (1 - d) x weights with d = decay ^ (B / reference_batch), so the average spans "
        "about reference_batch / (1 - decay) images on any number of GPUs (at B = "
        "reference_batch: 1 / (1 - decay) steps). 0.999-0.9999 for long runs; null: off",
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="stop when monitor has not improved for this many epochs; null: train all "
        "epochs (tune trials ignore it: ASHA stops them)",
    )
    monitor: Monitor = Field(
        "val_accuracy",
        description="the validation metric that picks the best epoch (the weights saved and "
        "evaluated) and drives early stopping; val_loss is minimised, the others maximised; "
        "val_roc_auc: binary tasks only",
    )
    max_failures: int = Field(
        2,
        ge=-1,
        description="times Ray Train restarts the workers from the last checkpoint after a "
        "failure (a node lost); -1: unlimited",
    )
    storage_path: str | None = Field(
        None,
        description="checkpoints: a folder or URL (s3://...); default models/<name>/checkpoints",
    )
    checkpoints_to_keep: int = Field(
        2,
        ge=1,
        description="latest checkpoints kept (to resume from; mid-epoch ones count too); the "
        "best epoch's weights are kept apart",
    )
    checkpoint_every: int | str | None = Field(
        None,
        description="also checkpoint within epochs: every this many optimizer steps, or every "
        "duration such as 15m (90s, 1.5h); a restarted run then continues the epoch at the "
        "next sample (exactly as uninterrupted with train.deterministic on the same ranks "
        "and loader_workers) instead of training the epoch again. History, W&B rows and the "
        "best model stay per epoch; null: at epoch ends only",
    )
    seed: int = Field(
        0, description="seeds the initial weights, the shuffling and the augmentation"
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _workers_shape(cls, value: Any) -> Any:
        return check_workers(value)

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _checkpoint_every_shape(cls, value: Any) -> Any:
        return check_checkpoint_every(value)

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
