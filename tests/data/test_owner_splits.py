"""Folder sources that keep their owner's splits (split folders, a CSV split column), the
checks on splits that come out empty, hard-linked fetch, and `describe_image_source`.

Real PNG files in tmp_path, fetched and prepared by the stage functions (prepare scans in this
process: fewer than 64 images, or `workers: 1`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from attnpipe.config import FolderSource, parse_recipe
from attnpipe.data.describe import describe_image_source
from attnpipe.data.prepare import PrepareError, prepare
from attnpipe.data.sources import FetchError, fetch
from attnpipe.paths import PipelinePaths

CLASSES = ("cat", "dog", "owl")


def _png(path: Path, seed: int, size: tuple[int, int] = (12, 10)) -> None:
    """A small PNG whose colour encodes `seed`: no two files are byte-identical."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (seed % 256, (seed // 256) * 40 % 256, 77)).save(path)


def _tree(root: Path, per_split: dict[str, int], classes=CLASSES) -> Path:
    """root/<split folder>/<class>/<n>.png, `per_split[folder]` images per class."""
    seed = 0
    for folder, count in per_split.items():
        for name in classes:
            for n in range(count):
                seed += 1
                _png(root / folder / name / f"{n}.png", seed)
    return root


def _run(tmp_path: Path, source: dict, **prepare_options) -> list[dict]:
    """fetch + prepare of a folder source; the manifest's rows."""
    recipe = parse_recipe(
        {
            "source": {"kind": "folder", **source},
            "prepare": {"workers": 1, **prepare_options},
            "model": {"name": "resnet50"},
        },
        name="t",
    )
    paths = PipelinePaths(tmp_path, "t")
    fetch(recipe, paths.raw, progress=False, root=tmp_path)
    prepare(recipe, paths, progress=False)
    assert json.loads(paths.classes.read_text())["classes"] == list(CLASSES)
    return pq.read_table(paths.manifest).to_pylist()


def _folder_split(image_id: str) -> str:
    folder = image_id.split("/")[0].lower()
    return {"valid": "val", "validation": "val"}.get(folder, folder)


@pytest.mark.parametrize("test_split", ["stratified", "official"])
def test_split_folders_are_kept_exactly(tmp_path: Path, test_split: str):
    tree = _tree(tmp_path / "mine", {"train": 4, "val": 2, "test": 2})
    # A training copy of a validation image: the validation image stays, the copy goes.
    (tree / "train" / "dog" / "copy.png").write_bytes((tree / "val" / "dog" / "0.png").read_bytes())
    rows = _run(tmp_path, {"path": "mine"}, test_split=test_split)
    assert len(rows) == 3 * (4 + 2 + 2)
    assert all(r["split"] == _folder_split(r["id"]) for r in rows)
    assert all(r["class_name"] == r["id"].split("/")[1] for r in rows)
    assert "train/dog/copy.png" not in {r["id"] for r in rows}
    rejected = (tmp_path / "data" / "t" / "rejected.csv").read_text()
    assert "train/dog/copy.png" in rejected and "duplicate of val/dog/0.png" in rejected


@pytest.mark.parametrize(
    "names", [("TRAIN", "Validation", "Test"), ("Train", "valid", "TEST"), ("train", "VAL", "test")]
)
def test_split_folder_names_in_any_case(tmp_path: Path, names: tuple[str, str, str]):
    _tree(tmp_path / "mine", dict.fromkeys(names, 2))
    rows = _run(tmp_path, {"path": "mine"})
    assert Counter(r["split"] for r in rows) == {"train": 6, "val": 6, "test": 6}
    assert all(r["split"] == _folder_split(r["id"]) for r in rows)


def test_missing_validation_split_is_carved_from_train_stratified(tmp_path: Path):
    _tree(tmp_path / "mine", {"train": 10, "test": 3})
    rows = _run(tmp_path, {"path": "mine"})  # splits 0.7/0.1/0.2: train/val as 0.875/0.125
    assert {r["id"] for r in rows if r["split"] == "test"} == {
        f"test/{name}/{n}.png" for name in CLASSES for n in range(3)
    }
    carved = Counter((r["class_name"], r["split"]) for r in rows if r["id"].startswith("train/"))
    for name in CLASSES:  # 10 x 0.875 = 8.75 -> 9 train, 1.25 -> 1 val, in every class
        assert (carved[(name, "train")], carved[(name, "val")]) == (9, 1), name


def test_csv_split_column_is_kept(tmp_path: Path):
    owners = {"Train": "train", "train": "train", "TRAIN": "train", "validation": "val",
              "Test": "test", "valid": "val"}  # fmt: skip
    expected, lines = {}, ["file,kind,Split"]
    for n in range(18):
        owner = list(owners)[n % 6]
        _png(tmp_path / "pics" / f"p{n}.png", n)
        lines.append(f"p{n},{CLASSES[n % 3]},{owner}")
        expected[f"p{n}"] = owners[owner]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    source = {
        "path": "pics", "labels_csv": "labels.csv", "id_column": "file", "label_column": "kind",
        "split_column": "Split", "image_suffix": ".png",
    }  # fmt: skip
    rows = _run(tmp_path, source)
    assert {r["id"]: r["split"] for r in rows} == expected
    assert Counter(expected.values()) == {"train": 9, "val": 6, "test": 3}


def test_unknown_csv_split_value_names_the_row_and_the_allowed_values(tmp_path: Path):
    _png(tmp_path / "pics" / "a.png", 1)
    _png(tmp_path / "pics" / "b.png", 2)
    (tmp_path / "labels.csv").write_text("image_id,label,split\na.png,x,train\nb.png,y,holdout\n")
    source = {"path": "pics", "labels_csv": "labels.csv", "split_column": "split"}
    with pytest.raises(FetchError, match=r"line 3 \(b\.png\): split 'holdout'.*train, val"):
        _run(tmp_path, source)


def test_class_folders_named_like_splits_are_refused(tmp_path: Path):
    # A class-per-folder tree with a class called "test": mixed, so neither reading is safe.
    _tree(tmp_path / "plain", {"": 2}, classes=("cats", "dogs", "test"))
    with pytest.raises(FetchError, match=r"test are split names but cats, dogs are not.*rename"):
        _run(tmp_path, {"path": "plain"})
    # Split folders one level too deep: train/train/<class>/.
    _tree(tmp_path / "deep" / "train", {"train": 2, "test": 1})
    with pytest.raises(FetchError, match=r"named like splits \(test, train\).*one level too deep"):
        _run(tmp_path, {"path": "deep"})
    # Two folders of one split.
    _tree(tmp_path / "twice", {"train": 2, "val": 1, "Validation": 1})
    with pytest.raises(FetchError, match=r"Validation/ and val/ both name the val split"):
        _run(tmp_path, {"path": "twice"})


def test_an_empty_validation_split_names_the_fraction_and_the_key(tmp_path: Path):
    _tree(tmp_path / "mine", {"train": 30, "test": 2})
    splits = {"train": 0.79, "val": 0.01, "test": 0.2}
    with pytest.raises(
        PrepareError,
        match=r"prepare\.splits\.val = 0\.01 of 90 train\+val image\(s\) gives 0 validation "
        r"images; raise prepare\.splits\.val",
    ):
        _run(tmp_path, {"path": "mine"}, splits=splits)


def test_a_class_missing_from_validation_or_training_is_an_error(tmp_path: Path):
    _tree(tmp_path / "mine", {"train": 10, "test": 1})
    for n in range(3, 10):  # owl keeps 3 training images: 0.125 x 3 rounds to no val image
        (tmp_path / "mine" / "train" / "owl" / f"{n}.png").unlink()
    with pytest.raises(PrepareError, match=r"no validation image to class\(es\) 'owl' \(3 image"):
        _run(tmp_path, {"path": "mine"})

    only_test = tmp_path / "other"
    _tree(only_test, {"train": 10, "test": 1}, classes=("cat", "dog"))
    _png(only_test / "test" / "owl" / "0.png", 999)
    with pytest.raises(PrepareError, match=r"'owl' \(1 image\(s\)\) have images only in the own"):
        _run(tmp_path, {"path": "other"})


# --------------------------------------------------------------------------- links
def test_fetch_links_the_images_and_copies_when_asked(tmp_path: Path):
    tree = _tree(tmp_path / "mine", {"train": 2, "test": 1})
    recipe = parse_recipe(
        {"source": {"kind": "folder", "path": "mine"}, "model": {"name": "resnet50"}}, name="t"
    )
    raw = tmp_path / "raw"
    fetch(recipe, raw, progress=False, root=tmp_path)
    copy = raw / "train_images" / "train" / "cat" / "0.png"
    original = tree / "train" / "cat" / "0.png"
    assert os.path.samefile(copy, original)  # one file on disk, not two
    assert copy.is_file() and not copy.is_symlink()  # what DVC hashes and caches as any file

    source = {"kind": "folder", "path": "mine", "link_files": False}
    copied = parse_recipe({"source": source, "model": {"name": "resnet50"}}, name="t")
    fetch(copied, raw, progress=False, root=tmp_path)  # another identity: fetched again
    assert not os.path.samefile(copy, original)
    assert copy.read_bytes() == original.read_bytes()


def test_fetch_copies_across_file_systems(tmp_path: Path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip(
            "needs /dev/shm on another file system than the temporary folder: the copy "
            "fallback is for links across file systems"
        )
    with tempfile.TemporaryDirectory(dir=shm) as elsewhere:
        tree = _tree(Path(elsewhere) / "mine", {"train": 2})
        source = {"kind": "folder", "path": str(tree)}
        recipe = parse_recipe({"source": source, "model": {"name": "resnet50"}}, name="t")
        fetch(recipe, tmp_path / "raw", progress=False, root=tmp_path)
        copy = tmp_path / "raw" / "train_images" / "train" / "dog" / "1.png"
        assert copy.read_bytes() == (tree / "train" / "dog" / "1.png").read_bytes()


# --------------------------------------------------------------------------- describe
def test_describe_split_folders(tmp_path: Path):
    tree = _tree(tmp_path / "mine", {"Train": 3, "test": 1})
    _png(tree / "test" / "cat" / "big.png", 500, size=(40, 30))
    summary = describe_image_source(tree)
    assert summary.layout == "split-folders"
    assert summary.classes == CLASSES and summary.owner_splits == ("train", "test")
    assert summary.counts == {
        "train": dict.fromkeys(CLASSES, 3),
        "test": {"cat": 2, "dog": 1, "owl": 1},
    }
    assert summary.images == 13 and summary.missing == 0
    assert summary.median_size == (12, 10) and summary.sampled == 13
    assert summary.median_side == 10 and summary.folder == tree
    assert summary.settings == {"kind": "folder", "path": str(tree)}
    FolderSource.model_validate(summary.settings)
    assert summary.split_total("train") == 9 and summary.total == 13
    assert summary.class_totals() == {"cat": 5, "dog": 4, "owl": 4}
    text = summary.describe()
    assert "13 images, split folders" in text and "the owner's splits: train, test" in text


def test_describe_class_folders(tmp_path: Path):
    tree = _tree(tmp_path / "mine", {"": 2})
    summary = describe_image_source(tree, sample=4)
    assert summary.layout == "class-folders" and summary.owner_splits == ()
    assert summary.counts == {"all": dict.fromkeys(CLASSES, 2)} and summary.sampled == 4


def test_describe_a_csv_guesses_its_columns(tmp_path: Path):
    lines = ["Filename,Class,subset,note"]
    for n in range(6):
        _png(tmp_path / "pics" / f"im{n}.png", n, size=(20 + n, 10))
        lines.append(f"im{n},{CLASSES[n % 2]},{('train', 'Valid', 'test')[n % 3]},x")
    lines.append("gone,cat,train,x")  # no such file
    (tmp_path / "pics" / "labels.csv").write_text("\n".join(lines) + "\n")
    summary = describe_image_source(tmp_path / "pics" / "labels.csv")
    assert summary.layout == "csv" and summary.classes == ("cat", "dog")
    assert summary.owner_splits == ("train", "val", "test")
    assert summary.counts["train"] == {"cat": 2, "dog": 1} and summary.missing == 1
    assert summary.median_size == (22, 10)
    csv_path = tmp_path / "pics" / "labels.csv"
    assert summary.source_settings["labels_csv"] == csv_path
    assert summary.settings == {
        "kind": "folder",
        "path": str(tmp_path / "pics"),
        "labels_csv": str(tmp_path / "pics" / "labels.csv"),
        "id_column": "Filename",
        "label_column": "Class",
        "split_column": "subset",
        "image_suffix": ".png",
    }
    FolderSource.model_validate(summary.settings)
