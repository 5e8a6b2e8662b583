"""Layout adapters: turn a raw download folder into labelled records.

A record references an image file; nothing is decoded here (that is `prepare`'s scan).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from attnpipe.config import (
    FolderSource,
    KaggleCompetitionSource,
    KaggleDatasetSource,
    Recipe,
    SklearnDigitsSource,
    TorchvisionSource,
)
from attnpipe.data.labels import natural_key
from attnpipe.errors import AttnpipeError

MELANOMA_IMAGES = "512x512-dataset-melanoma/512x512-dataset-melanoma"
MELANOMA_CLASSES = {"0": "benign", "1": "melanoma"}


@dataclass(frozen=True, slots=True)  # no per-record __dict__: a million records, 100 MB less
class RawRecord:
    """One labelled row of a raw dataset. `label` is the raw label text, not yet an index."""

    image_id: str
    # The image's path as text: a million records live until prepare ends, and a Path per
    # record cost about 400 B an image (pathlib interns every file name it parses).
    location: str
    label: str
    group: str | None = None
    split: str | None = None  # the dataset's official split ("train"/"test"), when it has one

    @property
    def path(self) -> Path:
        return Path(self.location)


@dataclass(frozen=True)
class RawIndex:
    records: list[RawRecord]
    class_names: list[str]  # index -> human-readable name
    label_values: list[str]  # index -> the raw label text used in the CSV
    # The records' splits are their owner's (a folder source's split folders or split column):
    # prepare keeps them whatever prepare.test_split says.
    keeps_splits: bool = False


class LayoutError(AttnpipeError, ValueError):
    """The raw folder does not look like the layout the recipe names."""


def read_layout(recipe: Recipe, raw_dir: Path) -> RawIndex:
    """Read `raw_dir` with the layout reader of the recipe's source kind."""
    from attnpipe.data.source_kinds import resolve, source_kind

    return resolve(source_kind(recipe.source.kind).layout)(recipe.source, raw_dir)


def read_digits(source: SklearnDigitsSource, raw_dir: Path) -> RawIndex:
    return read_csv_layout(raw_dir, "train.csv", "train_images", "label_map.json")


def read_cassava(raw_dir: Path) -> RawIndex:
    """train.csv (image_id,label) + train_images/<image_id> + {"0": "Cassava ...", ...}."""
    return read_csv_layout(raw_dir, "train.csv", "train_images", "label_num_to_disease_map.json")


def read_melanoma(raw_dir: Path) -> RawIndex:
    """marking.csv, one row per image; a patient's images stay in one split."""
    return read_csv_layout(
        raw_dir,
        "marking.csv",
        MELANOMA_IMAGES,
        MELANOMA_CLASSES,
        label_column="target",
        group_column="patient_id",
        image_suffix=".jpg",
    )


IMAGENET_DATA = "ILSVRC/Data/CLS-LOC"
IMAGENET_SYNSETS = "LOC_synset_mapping.txt"
IMAGENET_VAL_LABELS = "LOC_val_solution.csv"


def read_imagenet(raw_dir: Path) -> RawIndex:
    """ImageNet-1k as Kaggle's imagenet-object-localization-challenge serves it.

    Classes: LOC_synset_mapping.txt, index i = line i (torchvision's and timm's order, so an
    ImageNet-initialised classifier lines up). Training images: train/<wnid>/*. The 50,000
    validation images (val/, classes from the first token of LOC_val_solution.csv's
    PredictionString) are marked as the official test split; test/ has no labels and is never
    read here.
    """
    wnids, names = read_synsets(raw_dir / IMAGENET_SYNSETS)
    records = _imagenet_train(raw_dir / IMAGENET_DATA / "train", set(wnids))
    records += _imagenet_val(raw_dir / IMAGENET_VAL_LABELS, raw_dir / IMAGENET_DATA / "val")
    return RawIndex(records=records, class_names=names, label_values=wnids)


def read_synsets(path: Path) -> tuple[list[str], list[str]]:
    """(wnids, names) in file order. A name is the first of the synset's words; the few that
    repeat (two synsets are both "crane") get their wnid added, so every name is unique."""
    if not path.is_file():
        raise LayoutError(f"{path} is missing: run `attnpipe fetch` first")
    wnids, names = [], []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        wnid, _, words = line.strip().partition(" ")
        if not wnid.startswith("n") or not words:
            raise LayoutError(
                f"{path}, line {line_number}: expected '<wnid> <names>', got {line.strip()!r}"
            )
        wnids.append(wnid)
        names.append(words.split(",")[0].strip())
    if len(set(wnids)) != len(wnids):
        raise LayoutError(f"{path}: a wnid is listed twice; the download looks damaged")
    counts = Counter(names)
    unique = [f"{n} ({w})" if counts[n] > 1 else n for w, n in zip(wnids, names, strict=True)]
    return wnids, unique


def _imagenet_train(train_dir: Path, wnids: set[str]) -> list[RawRecord]:
    if not train_dir.is_dir():
        raise LayoutError(f"{train_dir} is missing: run `attnpipe fetch` first")
    folders = sorted(p for p in train_dir.iterdir() if p.is_dir())
    strangers = [p.name for p in folders if p.name not in wnids]
    if strangers:
        raise LayoutError(
            f"{train_dir}: folder(s) {', '.join(strangers[:10])} are not synsets of "
            f"{IMAGENET_SYNSETS}; remove them or fetch again"
        )
    records = []
    for folder in folders:
        label, prefix = sys.intern(folder.name), str(folder)
        names = sorted(entry.name for entry in os.scandir(prefix) if entry.is_file())
        records += [
            RawRecord(
                image_id=os.path.splitext(name)[0],
                location=os.path.join(prefix, name),
                label=label,
                split="train",
            )
            for name in names
        ]
    return records


def _imagenet_val(csv_path: Path, val_dir: Path) -> list[RawRecord]:
    if not csv_path.is_file():
        raise LayoutError(f"{csv_path} is missing: run `attnpipe fetch` first")
    records, prefix = [], str(val_dir)
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or []):
            raise LayoutError(
                f"{csv_path}: expected columns ImageId,PredictionString; found "
                f"{', '.join(reader.fieldnames or [])}"
            )
        for line, row in enumerate(reader, start=2):
            tokens = row["PredictionString"].split()
            if not tokens:
                raise LayoutError(f"{csv_path}, line {line}: {row['ImageId']} has no class")
            image_id = row["ImageId"].strip()
            location = os.path.join(prefix, f"{image_id}.JPEG")
            label = sys.intern(tokens[0])
            records.append(
                RawRecord(image_id=image_id, location=location, label=label, split="test")
            )
    return records


# The named layouts of Kaggle downloads (`source.layout` in the recipe).
NAMED_LAYOUTS = {"cassava": read_cassava, "melanoma": read_melanoma, "imagenet": read_imagenet}


def read_named_layout(
    source: KaggleCompetitionSource | KaggleDatasetSource, raw_dir: Path
) -> RawIndex:
    return NAMED_LAYOUTS[source.layout](raw_dir)


def read_torchvision(source: TorchvisionSource, raw_dir: Path) -> RawIndex:
    """What `fetch` converted torchvision's files to, with the official split column."""
    return read_csv_layout(
        raw_dir, "train.csv", "train_images", "label_map.json", split_column="split"
    )


def read_folder(source: FolderSource, raw_dir: Path) -> RawIndex:
    """What `fetch` wrote: train.csv with a split column (empty where the owner gave none)."""
    index = read_csv_layout(
        raw_dir,
        "train.csv",
        "train_images",
        "label_map.json",
        group_column="group",
        image_suffix=source.image_suffix if source.labels_csv else "",
        # A raw folder fetched before splits were kept has no such column: no owner splits.
        split_column="split" if "split" in _csv_columns(raw_dir / "train.csv") else None,
    )
    strange = sorted({r.split for r in index.records} - {None, "train", "val", "test"})
    if strange:
        raise LayoutError(
            f"{raw_dir / 'train.csv'}: split(s) {', '.join(strange)} are not train, val or "
            "test; the file was not written by `attnpipe fetch`: fetch again"
        )
    owned = any(r.split for r in index.records)
    return dataclasses.replace(index, keeps_splits=owned) if owned else index


def _csv_columns(path: Path) -> list[str]:
    if not path.is_file():
        return []  # read_csv_layout says what is missing
    with path.open(newline="") as handle:
        return next(csv.reader(handle), [])


def read_csv_layout(
    raw_dir: Path,
    csv_name: str,
    images_dir: str,
    label_map: str | dict[str, str] | None,
    id_column: str = "image_id",
    label_column: str = "label",
    group_column: str | None = None,
    image_suffix: str = "",
    split_column: str | None = None,
) -> RawIndex:
    """A CSV of (id, label[, group][, split]) beside an image folder and a {label: name} map.

    `label_map` is a JSON file name in `raw_dir`, a dict, or None (the labels found, sorted).
    An empty group means "no group" (the image is a group of its own).
    """
    csv_path = raw_dir / csv_name
    if not csv_path.is_file():
        raise LayoutError(f"{csv_path} is missing: run `attnpipe fetch` first")
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        needed = [c for c in (id_column, label_column, group_column, split_column) if c]
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise LayoutError(
                f"{csv_path}: missing column(s) {', '.join(missing)}; "
                f"found {', '.join(reader.fieldnames or [])}"
            )
        # Text, not a Path per row (and labels interned): a million rows live until the end.
        prefix = str(raw_dir / images_dir)
        records = [
            RawRecord(
                image_id=row[id_column],
                location=os.path.join(prefix, f"{row[id_column]}{image_suffix}"),
                label=sys.intern(row[label_column].strip()),
                group=(row[group_column].strip() or None) if group_column else None,
                split=(sys.intern(row[split_column].strip()) or None) if split_column else None,
            )
            for row in reader
        ]
    escaping = [
        (line, r.image_id)
        for line, r in enumerate(records, start=2)
        if os.path.isabs(r.image_id) or ".." in r.image_id.split(os.sep)
    ]
    if escaping:
        shown = ", ".join(f"line {line} ({image_id!r})" for line, image_id in escaping[:10])
        raise LayoutError(f"{csv_path}: image ids must stay inside {images_dir}/: {shown}")
    if isinstance(label_map, str):
        map_path = raw_dir / label_map
        if not map_path.is_file():
            raise LayoutError(f"{map_path} is missing: the download looks incomplete")
        label_map = json.loads(map_path.read_text())
    if label_map:
        label_values = sorted(label_map, key=natural_key)
        class_names = [label_map[value] for value in label_values]
    else:
        label_values = sorted({r.label for r in records}, key=natural_key)
        class_names = list(label_values)
    return RawIndex(records=records, class_names=class_names, label_values=label_values)
