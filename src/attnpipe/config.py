"""Typed recipes: `pipelines/<name>.yaml` validated into objects at the edge.

Every stage reads its settings from a `Recipe`. Unknown keys, wrong types and unknown
pipeline names fail here with one line that names the key path and the valid choices, so
a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from attnpipe.errors import AttnpipeError


class ConfigError(AttnpipeError, ValueError):
    """A recipe or project setting is wrong; the message says which and how to fix it."""


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, objects are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- sources
class SklearnDigitsSource(Strict):
    """scikit-learn's bundled handwritten digits, written as a Kaggle-style folder."""

    kind: Literal["sklearn-digits"]
    image_size: int = Field(32, ge=8, description="side of the square RGB PNGs written")


class KaggleCompetitionSource(Strict):
    """A Kaggle competition's data files, through the official `kaggle` client.

    Needs Kaggle credentials and an account that accepted the competition's rules.
    """

    kind: Literal["kaggle-competition"]
    competition: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="the name in the URL")
    layout: Literal["cassava", "imagenet"] = Field(
        "cassava",
        description="cassava: train.csv + train_images/; imagenet: the ILSVRC CLS-LOC files of "
        "imagenet-object-localization-challenge (its validation images are the test split)",
    )
    include: tuple[str, ...] = Field(
        (),
        description="glob patterns of the archive members to extract (none: all); the rest "
        "is never written to disk",
    )
    exclude: tuple[str, ...] = Field(
        (), description="glob patterns of archive members not to extract (e.g. train_tfrecords/*)"
    )


class KaggleDatasetSource(Strict):
    """A Kaggle dataset (`owner/slug`), through the official `kaggle` client."""

    kind: Literal["kaggle-dataset"]
    dataset: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", description="owner/slug")
    layout: Literal["melanoma"] = "melanoma"
    include: tuple[str, ...] = Field(
        (), description="glob patterns of the archive members to extract (none: all)"
    )
    exclude: tuple[str, ...] = Field(
        (), description="glob patterns of archive members not to extract"
    )


class TorchvisionSource(Strict):
    """A torchvision dataset, downloaded by torchvision and converted to the CSV layout."""

    kind: Literal["torchvision"]
    dataset: Literal["CIFAR10", "CIFAR100", "FGVCAircraft"]
    download_dir: str | None = Field(
        None, description="where torchvision keeps the archive; default ~/.cache/attnpipe"
    )
    annotation_level: Literal["variant", "family", "manufacturer"] = Field(
        "variant", description="FGVCAircraft only: the label granularity"
    )
    remove_banner: bool = Field(
        True, description="FGVCAircraft only: crop the 20-pixel copyright banner at the bottom"
    )


class FolderSource(Strict):
    """A user's image tree: class-per-folder, or a flat folder plus a labels CSV.

    `fetch` copies it into `data/<name>/raw/` so that DVC versions a snapshot.
    """

    kind: Literal["folder"]
    path: str = Field(description="the image folder (relative to the project root or absolute)")
    labels_csv: str | None = Field(None, description="without it: one sub-folder per class")
    id_column: str = "image_id"
    label_column: str = "label"
    group_column: str | None = Field(None, description="e.g. a patient id: kept in one split")
    image_suffix: str = Field("", description="appended to ids that lack the file extension")


Source = Annotated[
    SklearnDigitsSource
    | KaggleCompetitionSource
    | KaggleDatasetSource
    | TorchvisionSource
    | FolderSource,
    Field(discriminator="kind"),
]
# kind -> its section's type: the members of the union above (attnpipe.data.source_kinds
# adds how each kind is fetched and read).
SOURCE_CONFIGS: dict[str, type[Strict]] = {
    member.model_fields["kind"].annotation.__args__[0]: member
    for member in get_args(get_args(Source)[0])
}


# --------------------------------------------------------------------------- stages
class SplitRatios(Strict):
    train: float = Field(0.7, gt=0, lt=1)
    val: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.2, ge=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitRatios:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split ratios must sum to 1, got {total:g}")
        return self


class PrepareConfig(Strict):
    splits: SplitRatios = SplitRatios()
    test_split: Literal["stratified", "official"] = Field(
        "stratified",
        description="official: the dataset's own test set (CIFAR, FGVC-Aircraft, ImageNet's "
        "50,000 validation images) is the test split and the rest is split train/val by their "
        "ratio, stratified (splits.test is ignored)",
    )
    seed: int = 0
    folds: int = Field(0, ge=0, description="0 = no k-fold column; else k-fold over train+val")
    max_reject_fraction: float = Field(0.01, ge=0, le=1)
    duplicates: Literal["keep-first", "error"] = "keep-first"
    max_pixels: int = Field(90_000_000, gt=0, description="decompression-bomb guard")
    workers: int = Field(0, ge=0, description="scan processes; 0 = one per core")


class ShardConfig(Strict):
    maxcount: int = Field(1000, gt=0, description="samples per shard at most")
    maxsize: int = Field(256 * 1024 * 1024, gt=0, description="bytes per shard at most")
    min_shards: int = Field(
        4,
        ge=1,
        description="per split, at least this many shards (more: a finer shuffle across epochs; "
        "readers split shards by sample, so any count works for any number of ranks and loader "
        "workers)",
    )
    image_size: int | None = Field(None, gt=0, description="shorter side at shard time")
    format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = Field(
        90, ge=1, le=100, description="90: 30% fewer bytes and 20% faster decoding than 95"
    )
    jpeg_subsampling: Literal["4:2:0", "4:4:4"] = Field(
        "4:2:0", description="chroma resolution: 4:2:0 halves the bytes and the decoding time"
    )
    workers: int = Field(0, ge=0, description="writer processes; 0 = one per core")
    publish_to: str | None = Field(
        None,
        description="also upload the shards here (s3://bucket/prefix, gs://..., or an absolute "
        "path on shared storage); train and evaluate then read them from here on every node",
    )

    @model_validator(mode="after")
    def _shared_location(self) -> ShardConfig:
        target = self.publish_to
        if target is not None and "://" not in target and not target.startswith("/"):
            raise ValueError(
                f"publish_to must be a URL (s3://bucket/prefix) or an absolute path that every "
                f"node sees, got {target!r}"
            )
        return self


class ModelConfig(Strict):
    name: str = Field(description="a registry model (`attnpipe models` lists them)")
    input_size: int = Field(224, ge=8)
    pretrained: str | None = Field(
        None,
        description="imagenet: torchvision's ImageNet weights for the backbone (attnvgg16 and "
        "the ResNet family); or the path of a state_dict file; none: trained from scratch",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="the model's own arguments (checked by name)"
    )

    @field_validator("pretrained")
    @classmethod
    def _none_is_none(cls, value: str | None) -> str | None:
        return None if value is None or value.strip().lower() in ("", "none") else value


class AugmentConfig(Strict):
    """Train-time augmentation (torchvision v2). Validation and evaluation resize and
    centre-crop only, and keep integer labels.

    Per image, on uint8 in the loader's workers: the crop, flips, rotation, `auto_augment` and
    colour jitter. Per batch, on the device after normalisation (`attnpipe.data.batch_augment`):
    random erasing, then MixUp or CutMix. Everything beyond the crop and flip is off by default.
    """

    random_resized_crop_scale: tuple[float, float] = (0.08, 1.0)
    random_resized_crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    horizontal_flip: float = Field(0.5, ge=0, le=1)
    vertical_flip: float = Field(0.0, ge=0, le=1)
    rotation_degrees: float = Field(0.0, ge=0, le=180)
    color_jitter: float = Field(0.0, ge=0, le=1, description="brightness/contrast/saturation")
    auto_augment: Literal["none", "randaugment", "trivialaugment"] = Field(
        "none",
        description="random image operations, no policy search: randaugment "
        "(randaugment_num_ops random operations of strength randaugment_magnitude) or "
        "trivialaugment (TrivialAugmentWide: one operation of random strength, no parameters)",
    )
    randaugment_num_ops: int = Field(
        2, ge=1, description="randaugment only: operations applied to each image"
    )
    randaugment_magnitude: int = Field(
        9, ge=0, le=30, description="randaugment only: their strength, 0-30 (torchvision's bins)"
    )
    random_erasing: float = Field(
        0.0,
        ge=0,
        le=1,
        description="per-image probability of erasing a rectangle (2-33% of the area, aspect "
        "0.3-3.3, torchvision's defaults) to 0, i.e. the mean after normalisation",
    )
    mixup_alpha: float = Field(
        0.0, ge=0, description="MixUp: the mixing weight ~ Beta(alpha, alpha); 0 = off (0.2-0.8)"
    )
    cutmix_alpha: float = Field(
        0.0, ge=0, description="CutMix: the pasted area's share ~ Beta(alpha, alpha); 0 = off (1.0)"
    )
    mix_prob: float = Field(
        1.0,
        ge=0,
        le=1,
        description="with MixUp or CutMix on: the probability that a batch is mixed; with both "
        "on, a mixed batch uses one of them, chosen at random",
    )
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


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


class WandbConfig(Strict):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "attnpipe"
    entity: str | None = None


class TrackingConfig(Strict):
    wandb: WandbConfig = WandbConfig()


class EvaluateConfig(Strict):
    batch_size: int = Field(128, ge=1)
    threshold: float = Field(0.5, gt=0, lt=1, description="binary tasks: positive if p >= this")
    flip_tta: bool = False
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
        description="with --address: Ray workers scoring the split; auto: one per GPU the "
        "cluster has or can add, else one per node with the CPUs for one",
    )
    cpus_per_worker: float | None = Field(None, gt=0, description="default: train's")
    gpus_per_worker: float | None = Field(None, ge=0, description="default: train's")

    @field_validator("workers")
    @classmethod
    def _positive_workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("evaluate.workers must be auto or at least 1")
        return value


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
