"""Layout adapters: turn a raw download folder into labelled records.

A record references an image file; nothing is decoded here (that is `prepare`'s scan).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from attnpipe.config import Recipe, SklearnDigitsSource


@dataclass(frozen=True)
class RawRecord:
    """One labelled row of a raw dataset. `label` is the raw label text, not yet an index."""

    image_id: str
    path: Path
    label: str
    group: str | None = None


@dataclass(frozen=True)
class RawIndex:
    records: list[RawRecord]
    class_names: list[str]  # index -> human-readable name
    label_values: list[str]  # index -> the raw label text used in the CSV


class LayoutError(ValueError):
    """The raw folder does not look like the layout the recipe names."""


def read_layout(recipe: Recipe, raw_dir: Path) -> RawIndex:
    source = recipe.source
    if isinstance(source, SklearnDigitsSource):
        return read_csv_layout(raw_dir, "train.csv", "train_images", "label_map.json")
    raise NotImplementedError(f"no layout adapter for source kind '{source.kind}' yet")


def read_csv_layout(
    raw_dir: Path,
    csv_name: str,
    images_dir: str,
    label_map_name: str | None,
    id_column: str = "image_id",
    label_column: str = "label",
    group_column: str | None = None,
    image_suffix: str = "",
) -> RawIndex:
    """A CSV of (id, label[, group]) beside an image folder and an optional {label: name} map."""
    csv_path = raw_dir / csv_name
    if not csv_path.is_file():
        raise LayoutError(f"{csv_path} is missing: run `attnpipe fetch` first")
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        needed = [c for c in (id_column, label_column, group_column) if c]
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise LayoutError(
                f"{csv_path}: missing column(s) {', '.join(missing)}; "
                f"found {', '.join(reader.fieldnames or [])}"
            )
        records = [
            RawRecord(
                image_id=row[id_column],
                path=raw_dir / images_dir / f"{row[id_column]}{image_suffix}",
                label=row[label_column].strip(),
                group=row[group_column] if group_column else None,
            )
            for row in reader
        ]
    if label_map_name:
        label_map = json.loads((raw_dir / label_map_name).read_text())
        label_values = sorted(label_map, key=_natural_key)
        class_names = [label_map[value] for value in label_values]
    else:
        label_values = sorted({r.label for r in records}, key=_natural_key)
        class_names = list(label_values)
    return RawIndex(records=records, class_names=class_names, label_values=label_values)


def _natural_key(text: str) -> tuple[int, int | str]:
    return (0, int(text)) if text.lstrip("-").isdigit() else (1, text)
