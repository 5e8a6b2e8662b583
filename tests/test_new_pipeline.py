"""`attnpipe init`: a recipe written from a user's images, checked like any recipe."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from attnpipe.cli import main
from attnpipe.config import ConfigError, load_recipe
from attnpipe.new_pipeline import add_to_params, init_pipeline
from tests.conftest import write_project

CLASSES = ("cat", "dog", "fox")
SPLIT_SIZES = {"train": 8, "val": 3, "test": 4}


def write_image(path: Path, seed: int, side: int = 24) -> None:
    """A distinct noise image (prepare drops byte-identical duplicates)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_split_tree(folder: Path, side: int = 24, split_names: dict | None = None) -> Path:
    """folder/<split>/<class>/<n>.png: three classes in train/, val/ and test/."""
    names = split_names or {split: split for split in SPLIT_SIZES}
    seed = 0
    for split, count in SPLIT_SIZES.items():
        for name in CLASSES:
            for index in range(count):
                seed += 1
                write_image(folder / names[split] / name / f"{index}.png", seed, side)
    return folder


def _project(tmp_path: Path) -> Path:
    (tmp_path / "project").mkdir()
    return write_project(tmp_path / "project")


def test_init_writes_a_valid_recipe_that_keeps_the_owners_splits(tmp_path, capsys):
    root = _project(tmp_path)
    images = write_split_tree(
        root / "images", split_names={"train": "Train", "val": "valid", "test": "TEST"}
    )
    assert main(["--root", str(root), "init", "mine", "--from", str(images)]) == 0
    out = capsys.readouterr().out
    assert "attnpipe run mine" in out and "pipelines/mine.yaml" in out
    assert "3 classes" in out or "cat, dog, fox" in out, out
    recipe = load_recipe("mine", root)
    assert recipe.source.kind == "folder"
    assert recipe.source.path == "images", "inside the project: a path that moves with it"
    # 24-pixel images: a CIFAR-layout network from scratch, no download.
    assert recipe.model.name == "attention56_cifar" and recipe.model.pretrained is None
    assert recipe.model.input_size == 32
    assert recipe.train.workers == "auto"
    text = (root / "pipelines/mine.yaml").read_text()
    assert "# 24-pixel images: a CIFAR-layout network" in text, "each choice says why"
    assert "# the owner's splits (train, val, test) are kept" in text
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["pipelines"] == ["digits", "mine"]
    assert "# Pipelines that `dvc repro` builds" in (root / "params.yaml").read_text()


def test_large_photos_get_imagenet_weights_and_smaller_shards(tmp_path):
    root = _project(tmp_path)
    folder = tmp_path / "photos"
    for index, name in enumerate(CLASSES * 4):
        write_image(folder / name / f"{index}.png", index, side=320)
    created = init_pipeline(root, "photos", str(folder))
    recipe = load_recipe("photos", root)
    assert recipe.source.path == str(folder.resolve()), "outside the project: absolute"
    assert recipe.model.name == "streamlined_resnet50"
    assert recipe.model.pretrained == "imagenet"
    assert recipe.shard.image_size == 256, "stored at the size training crops 224 from"
    assert recipe.evaluate.crop_ratio == 0.875
    text = (root / "pipelines/photos.yaml").read_text()
    assert "# ImageNet weights: 12 training images are too few" in text
    assert "# stored at 256 pixels" in text
    assert created.recipe_file == root / "pipelines/photos.yaml"


def test_a_labels_csv_with_a_split_column(tmp_path):
    root = _project(tmp_path)
    folder = tmp_path / "flat"
    rows = []
    for index in range(30):
        write_image(folder / f"img{index}.png", index)
        split = ("train", "train", "val", "test", "train")[index % 5]
        rows.append({"file": f"img{index}.png", "class": CLASSES[index % 3], "split": split})
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "class", "split"])
        writer.writeheader()
        writer.writerows(rows)
    init_pipeline(root, "flat", str(folder / "labels.csv"))
    recipe = load_recipe("flat", root)
    assert Path(recipe.source.labels_csv).name == "labels.csv"
    assert recipe.source.label_column == "class"
    assert recipe.source.split_column == "split"


def test_init_refuses_to_overwrite_and_bad_names(tmp_path, capsys):
    root = _project(tmp_path)
    images = write_split_tree(tmp_path / "images")
    with pytest.raises(ConfigError, match=r"exists.*--force"):
        init_pipeline(root, "digits", str(images))
    assert load_recipe("digits", root).source.kind == "sklearn-digits", "left as it was"
    with pytest.raises(ConfigError, match="lower-case"):
        init_pipeline(root, "My Images", str(images))
    assert main(["--root", str(root), "init", "x", "--from", str(tmp_path / "nowhere")]) == 1
    assert "no such folder or file" in capsys.readouterr().err
    init_pipeline(root, "digits", str(images), force=True)
    assert load_recipe("digits", root).source.kind == "folder"


def test_init_names_the_kaggle_references_it_reads(tmp_path):
    root = _project(tmp_path)
    init_pipeline(root, "cassava2", "kaggle:competition/cassava-leaf-disease-classification")
    assert load_recipe("cassava2", root).source.layout == "cassava"
    with pytest.raises(ConfigError, match="kaggle:competition/cassava-leaf-disease"):
        init_pipeline(root, "other", "kaggle:competition/titanic")
    assert not (root / "pipelines/other.yaml").exists()


def test_params_keep_their_comments_and_order(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("# built by dvc repro\npipelines:\n  - digits\n  # - cifar10\ntune: []\n")
    add_to_params(params, "mine")
    add_to_params(params, "mine")  # once only
    text = params.read_text()
    assert yaml.safe_load(text) == {"pipelines": ["digits", "mine"], "tune": []}
    assert text.startswith("# built by dvc repro\n") and "# - cifar10" in text
