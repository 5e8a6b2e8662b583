"""`attnpipe init`: a recipe for a user's own images, written from what is found there.

The folder or CSV is described (layout, classes, counts, the owner's splits, image sizes) and
the recipe's choices follow from that, each with a comment saying why: a model and an
initialisation for the data's size and image size, shards stored at the size the model reads,
split fractions that leave every class images in validation and test, and run settings for a
GPU machine (`train.workers: auto`, loader processes). The pipeline is added to params.yaml,
so that `dvc repro` builds it too.
"""

from __future__ import annotations

import math
import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from attnpipe.config import ConfigError, load_recipe, pipeline_path
from attnpipe.data.describe import SourceSummary, describe_image_source

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
# Images at most this side are read at CIFAR scale: the CIFAR-layout networks fit them, and
# ImageNet backbones would first upsample them 7x.
SMALL_IMAGE_SIDE = 64
# Below this many training images, start from ImageNet weights: too few to learn features.
FROM_SCRATCH_IMAGES = 100_000
# Kaggle references `init` knows how to read (the layouts of attnpipe.data.layouts).
KAGGLE_COMPETITION_LAYOUTS = {
    "cassava-leaf-disease-classification": "cassava",
    "imagenet-object-localization-challenge": "imagenet",
}
KAGGLE_DATASET_LAYOUTS = {"melanoma"}


@dataclass(frozen=True)
class CreatedPipeline:
    recipe_file: Path
    summary: str  # what was found, for the user to check


def init_pipeline(
    root: Path, name: str, origin: str, model: str | None = None, force: bool = False
) -> CreatedPipeline:
    """Write pipelines/<name>.yaml for `origin` (a folder, a labels CSV, or kaggle:...) and add
    `name` to params.yaml. The recipe is validated before anything is written."""
    if not NAME_PATTERN.match(name):
        raise ConfigError(
            f"pipeline name {name!r}: use lower-case letters, digits, '-' and '_' "
            "(it names pipelines/<name>.yaml and the data/, models/ and reports/ folders)"
        )
    target = pipeline_path(name, root)
    if target.exists() and not force:
        raise ConfigError(f"{target} exists: choose another name, or pass --force to replace it")
    if origin.startswith("kaggle:"):
        sections, summary = _kaggle_sections(origin), f"Kaggle source {origin[7:]}"
        reasons = {"source": "classes and counts are read when `attnpipe fetch` downloads it"}
    else:
        found = describe_image_source(_resolve(origin, root))
        sections, summary = _image_sections(found, root, model), found.describe()
        reasons = _reasons(found, sections)
    text = _render(name, origin, sections, reasons)
    target.parent.mkdir(parents=True, exist_ok=True)
    previous = target.read_text() if target.exists() else None
    target.write_text(text)
    try:
        load_recipe(name, root)  # the same checks as every stage: a bad guess fails here
    except ConfigError:
        if previous is None:
            target.unlink()
        else:
            target.write_text(previous)
        raise
    add_to_params(root / "params.yaml", name)
    return CreatedPipeline(target, summary)


def _resolve(origin: str, root: Path) -> Path:
    path = Path(origin).expanduser()
    path = path if path.is_absolute() else (Path.cwd() / path)
    if not path.exists():
        raise ConfigError(f"--from {origin}: no such folder or file")
    return path.resolve()


def _project_relative(path: Path, root: Path) -> str:
    """The path as a recipe should hold it: relative inside the project (it moves with the
    repository), absolute outside."""
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _image_sections(found: SourceSummary, root: Path, model: str | None) -> dict[str, Any]:
    source = {"kind": "folder", "path": _project_relative(found.folder, root)}
    for key, value in found.source_settings.items():
        source[key] = _project_relative(value, root) if isinstance(value, Path) else value
    small = found.median_side <= SMALL_IMAGE_SIDE
    train_images = found.split_total("train") or found.total
    name = model or _pick_model(small, train_images)
    input_size = 32 if small else 224
    pretrained = None if small or train_images >= FROM_SCRATCH_IMAGES else "imagenet"
    if model is not None and pretrained == "imagenet":
        pretrained = "imagenet" if name in _imagenet_models() else None
    return {
        "source": source,
        "prepare": {"splits": _split_fractions(found), "seed": 0},
        "shard": _shard_section(found, small, input_size),
        "model": {"name": name, "input_size": input_size, "pretrained": pretrained},
        "augment": _augment_section(small),
        "train": _train_section(pretrained is not None),
        "evaluate": {"crop_ratio": 1.0 if small else 0.875, "flip_tta": False},
        "tracking": {"wandb": {"mode": "offline", "project": "attnpipe"}},
    }


def _reasons(found: SourceSummary, sections: dict[str, Any]) -> dict[str, str]:
    """Why init chose each section's values: a comment above it in the recipe."""
    model, train, shard = sections["model"], sections["train"], sections["shard"]
    side = found.median_side
    if found.owner_splits:
        split = (
            f"the owner's splits ({', '.join(found.owner_splits)}) are kept as given; the "
            "fractions only carve what is missing, stratified"
        )
    else:
        split = "fractions that leave the smallest class images in validation and test"
    if model["pretrained"] == "imagenet":
        start = f"ImageNet weights: {found.split_total('train') or found.total} training images"
        start += " are too few to learn features from scratch"
    elif side <= SMALL_IMAGE_SIDE:
        start = f"{side}-pixel images: a CIFAR-layout network, from scratch"
    else:
        start = "from scratch: enough images to learn features"
    stored = shard.get("image_size")
    return {
        "source": f"{found.images} images, {len(found.classes)} classes ({found.layout})",
        "prepare": split,
        "shard": f"stored at {stored} pixels (shorter side), the size training crops from"
        if stored
        else f"full resolution: the images ({side} pixels) are no larger than training needs",
        "model": start,
        "train": f"for the GPUs of the cluster that runs it: a rank per GPU (auto), "
        f"{train['loader_workers']} loader processes per rank (from this machine's cores), "
        "the rate scaled with the global batch",
    }


def _pick_model(small: bool, train_images: int) -> str:
    if small:
        return "attention56_cifar"
    return "attention56" if train_images >= FROM_SCRATCH_IMAGES else "streamlined_resnet50"


def _imagenet_models() -> set[str]:
    from attnpipe.models import imagenet_models

    return set(imagenet_models())


def _split_fractions(found: SourceSummary) -> dict[str, float]:
    """Fractions that leave the smallest class at least two images in each carved split: 10%
    each where classes have 20 images or more, up to 25% each for tiny classes. Splits the
    owner gave are kept whatever the fractions (they only carve what is missing)."""
    smallest = min(found.class_totals().values(), default=0)
    share = 0.1 if smallest >= 20 else min(0.25, math.ceil(200 / max(smallest, 1)) / 100)
    val = test = round(share, 2)
    return {"train": round(1 - val - test, 2), "val": val, "test": test}


def _shard_section(found: SourceSummary, small: bool, input_size: int) -> dict[str, Any]:
    section: dict[str, Any] = {"format": "png" if small else "jpg"}
    # Stored at the size training crops from (ImageNet's 256 for 224): decoding a 4000-pixel
    # photo for a 224-pixel crop would cost a GPU's loaders most of their time.
    stored = math.ceil(input_size / 0.875)
    if found.median_side > stored:
        section["image_size"] = stored
    return section


def _augment_section(small: bool) -> dict[str, Any]:
    if small:
        return {"random_resized_crop_scale": [0.6, 1.0], "horizontal_flip": 0.5}
    return {"random_resized_crop_scale": [0.08, 1.0], "horizontal_flip": 0.5}


def _train_section(fine_tuning: bool) -> dict[str, Any]:
    """Settings for the GPUs of whatever cluster runs it: a rank per GPU, loader processes
    from this machine's cores per GPU (at most 4), the rate scaled with the global batch."""
    gpus = _local_gpus()
    cores = os.cpu_count() or 1
    loaders = max(0, min(4, cores // max(gpus, 1) - 1))
    return {
        "workers": "auto",
        "use_gpu": "auto",
        "cpus_per_worker": loaders + 1,
        "loader_workers": loaders,
        "epochs": 30 if fine_tuning else 90,
        "batch_size": 64,
        "optimizer": {
            "name": "sgd",
            "lr": 0.01 if fine_tuning else 0.1,
            "scale_lr": "linear",
            "reference_batch": 256,
            "weight_decay": 1e-4,
        },
        "schedule": {"name": "cosine", "warmup_epochs": 1},
        "loss": {"name": "cross_entropy", "label_smoothing": 0.1},
        "early_stopping_patience": 10,
        "seed": 0,
    }


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _kaggle_sections(origin: str) -> dict[str, Any]:
    kind, _, ref = origin[len("kaggle:") :].partition("/")
    if kind == "competition" and ref in KAGGLE_COMPETITION_LAYOUTS:
        source = {"kind": "kaggle-competition", "competition": ref}
        source["layout"] = KAGGLE_COMPETITION_LAYOUTS[ref]
    elif kind == "dataset" and ref.count("/") == 1:
        source = {"kind": "kaggle-dataset", "dataset": ref, "layout": "melanoma"}
    else:
        known = ", ".join(f"kaggle:competition/{name}" for name in KAGGLE_COMPETITION_LAYOUTS)
        raise ConfigError(
            f"--from {origin}: init reads {known}, or kaggle:dataset/OWNER/SLUG in the "
            "melanoma layout; for other Kaggle data, download it and pass the folder or CSV"
        )
    return {
        "source": source,
        "prepare": {"splits": {"train": 0.8, "val": 0.1, "test": 0.1}, "seed": 0},
        "shard": {"format": "jpg", "image_size": 256},
        "model": {"name": "streamlined_resnet50", "input_size": 224, "pretrained": "imagenet"},
        "augment": _augment_section(small=False),
        "train": _train_section(fine_tuning=True),
        "evaluate": {"crop_ratio": 0.875},
        "tracking": {"wandb": {"mode": "offline", "project": "attnpipe"}},
    }


def _render(name: str, origin: str, sections: dict[str, Any], reasons: dict[str, str]) -> str:
    header = (
        f"# Written by `attnpipe init {name} --from {origin}`: edit freely.\n"
        f"# Every key with its default: `attnpipe config show {name}`; what each does: "
        "docs/recipe.md.\n"
    )
    blocks = []
    for key, value in sections.items():
        why = "".join(f"# {line}\n" for line in textwrap.wrap(reasons.get(key, ""), 94))
        body = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=None, width=96)
        blocks.append(why + body)
    return header + "\n".join(blocks)


def add_to_params(params_file: Path, name: str) -> None:
    """Append `name` to the `pipelines:` list of params.yaml, keeping its comments."""
    if not params_file.exists():
        params_file.write_text(f"pipelines:\n  - {name}\n")
        return
    lines = params_file.read_text().splitlines()
    data = yaml.safe_load("\n".join(lines)) or {}
    if name in (data.get("pipelines") or []):
        return
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("pipelines:"))
    except StopIteration:
        lines += ["pipelines:", f"  - {name}"]
    else:
        if lines[start].strip() != "pipelines:":  # a flow list: pipelines: [a, b]
            raise ConfigError(
                f"{params_file}: write 'pipelines:' as a block list to let init add '{name}'"
            )
        end = start + 1
        while end < len(lines) and lines[end].startswith(("  -", "  #", "- ")):
            end += 1
        lines.insert(end, f"  - {name}")
    params_file.write_text("\n".join(lines) + "\n")
