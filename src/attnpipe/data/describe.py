"""What a user's image folder or labels CSV holds, before there is a recipe (`attnpipe init`).

It reads the tree exactly as `fetch` of a folder source would (`sources.folder_rows`,
`sources.read_labels_csv`), so what it reports is what the pipeline will see, and a tree that
fetch would refuse raises the same `FetchError` here. Nothing is copied or decoded: image
sizes come from the headers of a small sample.
"""

from __future__ import annotations

import csv
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from attnpipe.config import FolderSource
from attnpipe.data.labels import natural_key, split_name
from attnpipe.data.sources import (
    IMAGE_SUFFIXES,
    FetchError,
    FolderRow,
    folder_rows,
    read_labels_csv,
)

SPLITS = ("train", "val", "test")  # prepare.SPLITS, without importing prepare (pyarrow)
UNSPLIT = "all"  # the counts' key for images without an owner's split
SAMPLE_IMAGES = 50
# Column names that usually hold ids, labels and splits, in order of preference (lower case).
ID_COLUMNS = ("image_id", "id", "image", "filename", "file_name", "file", "path", "name")
LABEL_COLUMNS = ("label", "class", "class_name", "target", "category", "diagnosis")
SPLIT_COLUMNS = ("split", "subset", "set", "partition")


@dataclass(frozen=True)
class SourceSummary:
    """A folder source as the pipeline would read it."""

    layout: Literal["split-folders", "class-folders", "csv"]
    folder: Path  # the image folder (source.path)
    classes: tuple[str, ...]  # in label order (numbers by value, then text)
    # split ("train", "val", "test"; "all" for images without an owner's split) -> class ->
    # images; a class without images in a split is left out of it
    counts: dict[str, dict[str, int]]
    owner_splits: tuple[str, ...]  # the owner's splits present, in train, val, test order
    images: int
    missing: int  # CSV rows whose file is not in the folder (prepare would reject them)
    median_size: tuple[int, int] | None  # (width, height), the median of the sampled images
    median_side: int  # the median of their shorter sides (shard.image_size's measure); 0: none
    sampled: int  # images whose size was read
    settings: dict[str, Any]  # the recipe's `source:` section that reads it (kind: folder)

    @property
    def total(self) -> int:
        return self.images

    @property
    def source_settings(self) -> dict[str, Any]:
        """`settings` less kind and path; labels_csv as a Path (to be made project-relative)."""
        rest = {k: v for k, v in self.settings.items() if k not in ("kind", "path")}
        if "labels_csv" in rest:
            rest["labels_csv"] = Path(rest["labels_csv"])
        return rest

    def split_total(self, split: str) -> int:
        """Images in the owner's `split` ("train", "val", "test"; "all": without a split)."""
        return sum(self.counts.get(split, {}).values())

    def class_totals(self) -> dict[str, int]:
        """Images per class over every split."""
        return {name: sum(c.get(name, 0) for c in self.counts.values()) for name in self.classes}

    def describe(self) -> str:
        """A few lines for the user: the layout, the classes, the counts, the image size."""
        layouts = {
            "split-folders": "split folders of class folders",
            "class-folders": "one folder per class",
            "csv": f"a labels CSV ({self.settings.get('labels_csv')})",
        }
        lines = [f"{self.folder}: {self.images} images, {layouts[self.layout]}"]
        if self.missing:
            lines.append(f"  {self.missing} listed image(s) are missing (prepare rejects them)")
        owner = ", ".join(self.owner_splits) or "none (prepare splits the images)"
        lines.append(f"  the owner's splits: {owner}")
        shown = ", ".join(f"{name} ({n})" for name, n in list(self.class_totals().items())[:20])
        more = f" and {len(self.classes) - 20} more" if len(self.classes) > 20 else ""
        lines.append(f"  {len(self.classes)} classes: {shown}{more}")
        for split, per_class in self.counts.items():
            lines.append(f"  {split}: {sum(per_class.values())} images")
        if self.median_size:
            width, height = self.median_size
            lines.append(f"  median image size {width}x{height} (of {self.sampled} sampled)")
        return "\n".join(lines)


def describe_image_source(
    path: Path | str,
    labels_csv: Path | str | None = None,
    *,
    id_column: str | None = None,
    label_column: str | None = None,
    split_column: str | None = None,
    sample: int = SAMPLE_IMAGES,
) -> SourceSummary:
    """Describe an image folder (class folders, or train/val/test folders of class folders), or
    a folder plus a labels CSV; `path` may also be the CSV itself (its folder holds the images).

    CSV columns not given are guessed from their names (`ID_COLUMNS`, `LABEL_COLUMNS`, and a
    `SPLIT_COLUMNS` column whose every value is a split name); so is the image suffix when the
    ids lack one. `settings` holds what was chosen, ready for a recipe's `source:` section.
    """
    path = Path(path)
    if labels_csv is None and path.is_file() and path.suffix.lower() == ".csv":
        labels_csv, path = path, path.parent
    if not path.is_dir():
        raise FetchError(f"{path} is not a folder: give the image folder (or the labels CSV)")
    if labels_csv is None:
        layout, rows = folder_rows(path)
        source = FolderSource(kind="folder", path=str(path))
        suffix = ""
    else:
        source = _csv_source(path, Path(labels_csv), id_column, label_column, split_column)
        layout, rows, suffix = "csv", read_labels_csv(Path(labels_csv), source), source.image_suffix
    files = [path / (row.image_id + suffix) for row in rows]
    present = [file for file in files if file.is_file()]
    size, side, sampled = _median_size(present, sample)
    return SourceSummary(
        layout=layout,
        folder=path,
        classes=tuple(sorted({row.label for row in rows}, key=natural_key)),
        counts=_counts(rows),
        owner_splits=tuple(s for s in SPLITS if any(row.split == s for row in rows)),
        images=len(rows),
        missing=len(files) - len(present),
        median_size=size,
        median_side=side,
        sampled=sampled,
        settings=source.model_dump(mode="json", exclude_defaults=True) | {"kind": "folder"},
    )


def _counts(rows: list[FolderRow]) -> dict[str, dict[str, int]]:
    tally = Counter((row.split or UNSPLIT, row.label) for row in rows)
    order = [*SPLITS, UNSPLIT]
    return {
        split: {
            label: tally[(split, label)]
            for label in sorted({lab for s, lab in tally if s == split}, key=natural_key)
        }
        for split in order
        if any(s == split for s, _ in tally)
    }


def _csv_source(
    folder: Path,
    csv_path: Path,
    id_column: str | None,
    label_column: str | None,
    split_column: str | None,
) -> FolderSource:
    """The folder source that reads this CSV: the given columns, the others guessed."""
    if not csv_path.is_file():
        raise FetchError(f"{csv_path} does not exist")
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    if len(header) < 2:
        raise FetchError(
            f"{csv_path}: expected a header with an image id column and a label column, "
            f"found {header}"
        )
    id_column = id_column or _pick(header, ID_COLUMNS) or header[0]
    others = [h for h in header if h != id_column]
    label_column = label_column or _pick(others, LABEL_COLUMNS) or others[0]
    if split_column is None:
        # Only a column whose every value is a split name: "set" may mean something else.
        splits = [h for h in others if h.lower() in SPLIT_COLUMNS and h != label_column]
        split_column = next(
            (h for h in splits if rows and all(split_name(row[h] or "") for row in rows)), None
        )
    first = rows[0][id_column].strip() if rows else ""
    return FolderSource(
        kind="folder",
        path=str(folder),
        labels_csv=str(csv_path),
        id_column=id_column,
        label_column=label_column,
        split_column=split_column,
        image_suffix=_suffix(folder, first),
    )


def _pick(header: list[str], preferred: tuple[str, ...]) -> str | None:
    by_name = {h.lower(): h for h in header}
    return next((by_name[name] for name in preferred if name in by_name), None)


def _suffix(folder: Path, image_id: str) -> str:
    """ "" when the id names its file, else the image suffix that completes it (e.g. ".jpg")."""
    if not image_id or (folder / image_id).is_file():
        return ""
    for suffix in sorted(IMAGE_SUFFIXES):
        for candidate in (suffix, suffix.upper()):
            if (folder / f"{image_id}{candidate}").is_file():
                return candidate
    return ""


def _median_size(files: list[Path], sample: int) -> tuple[tuple[int, int] | None, int, int]:
    """The median (width, height) and shorter side of up to `sample` images spread over
    `files`, and how many were read; only headers are read (PIL decodes nothing until asked)."""
    step = max(1, len(files) // max(sample, 1))
    sizes = []
    for file in files[::step][:sample]:
        try:
            with Image.open(file) as image:
                sizes.append(image.size)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue  # prepare says why; a summary just leaves it out
    if not sizes:
        return None, 0, 0
    width = statistics.median_low(w for w, _ in sizes)
    height = statistics.median_low(h for _, h in sizes)
    return (width, height), statistics.median_low(min(size) for size in sizes), len(sizes)
