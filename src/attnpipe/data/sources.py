"""`fetch`: bring a dataset into `data/<name>/raw/` in its native (Kaggle-style) layout.

Each source writes or downloads files only; reading them into labelled records is the job of
the layout adapters in `attnpipe.data.layouts`, so the embedded digits take the same code
path as a real Kaggle competition.

Sources that download or copy (Kaggle, torchvision, folder) finish by writing a completion
marker, `raw/.attnpipe-fetch.json`, that records what was fetched (the source's identity, the
number of files and their bytes). A later `fetch` of the same source finds the marker, checks
that the files are still all there, and downloads nothing.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from attnpipe.config import FolderSource, Recipe, SklearnDigitsSource
from attnpipe.data.labels import SPLIT_ALIASES_TEXT, natural_key, split_name
from attnpipe.data.source_kinds import resolve, source_kind
from attnpipe.errors import AttnpipeError

MARKER_NAME = ".attnpipe-fetch.json"
DOWNLOAD_DIR_NAME = ".download"  # partial downloads, kept between attempts for resuming

DIGIT_NAMES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
]  # fmt: skip

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class FetchError(AttnpipeError, RuntimeError):
    """The dataset cannot be fetched; the message says why and what to do (one line)."""


def fetch(recipe: Recipe, raw_dir: Path, progress: bool = True, root: Path | None = None) -> Path:
    """Fetch `recipe.source` into `raw_dir` and return it.

    `root` resolves a folder source's relative `path` (default: the current directory).
    """
    source = recipe.source
    kind = source_kind(source.kind)
    root = root or Path.cwd()
    if not kind.marker:
        # Fresh files, never writes into old ones: after `dvc repro` they are links to DVC's
        # cache (.dvc/config cache.type), and writing through one would change the cache.
        clear_raw(raw_dir)
        resolve(kind.fetch)(source, raw_dir, progress=progress, root=root)
        return raw_dir
    identity = source_identity(source, root)
    if is_fetched(raw_dir, identity):
        print(f"{raw_dir} already holds this {source.kind} source: nothing to fetch")
        return raw_dir
    clear_raw(raw_dir)
    resolve(kind.fetch)(source, raw_dir, progress=progress, root=root)
    write_marker(raw_dir, identity)
    return raw_dir


# --------------------------------------------------------------------------- marker
def source_identity(source, root: Path) -> dict:
    """What decides the fetched bytes (not how they are read later: `layout` is left out).

    For a folder source that includes the folder's inventory (files and bytes) and the
    labels CSV's hash, so that a changed folder is copied again.
    """
    data = source.model_dump(mode="json")
    for key in ("layout", "download_dir"):
        data.pop(key, None)
    if isinstance(source, FolderSource):
        folder = _resolve(source.path, root)
        data["tree"] = list(_inventory(folder)) if folder.is_dir() else None
        if source.labels_csv:
            labels = _resolve(source.labels_csv, root)
            data["labels_sha256"] = (
                hashlib.sha256(labels.read_bytes()).hexdigest() if labels.is_file() else None
            )
    return data


def _resolve(path: str, root: Path) -> Path:
    resolved = Path(path).expanduser()
    return resolved if resolved.is_absolute() else root / resolved


def _inventory(raw_dir: Path) -> tuple[int, int]:
    files = total = 0
    for dirpath, dirnames, filenames in os.walk(raw_dir):
        if Path(dirpath) == raw_dir:
            dirnames[:] = [d for d in dirnames if d != DOWNLOAD_DIR_NAME]
            filenames = [f for f in filenames if f != MARKER_NAME]
        for name in filenames:
            files += 1
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return files, total


def write_marker(raw_dir: Path, identity: dict) -> None:
    files, total = _inventory(raw_dir)
    marker = {"source": identity, "files": files, "bytes": total}
    (raw_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def is_fetched(raw_dir: Path, identity: dict) -> bool:
    """True when the marker names this source and every file it counted is still there."""
    try:
        marker = json.loads((raw_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("source") != identity:
        return False
    return _inventory(raw_dir) == (marker.get("files"), marker.get("bytes"))


def clear_raw(raw_dir: Path) -> None:
    """Empty `raw_dir` before a fresh fetch, keeping partial downloads for resuming."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    for item in raw_dir.iterdir():
        if item.name == DOWNLOAD_DIR_NAME:
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()


# --------------------------------------------------------------------------- digits
def fetch_digits(
    source: SklearnDigitsSource, raw_dir: Path, progress: bool = True, root: Path | None = None
) -> None:
    write_sklearn_digits(raw_dir, image_size=source.image_size)


def write_sklearn_digits(raw_dir: Path, image_size: int = 32) -> None:
    """Write scikit-learn's bundled digits as `train.csv` + `train_images/*.png` + label map.

    The 8x8 images (values 0..16) are scaled to 0..255 and enlarged with bicubic resampling to
    `image_size` RGB, the layout of the Cassava competition download.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images_dir = raw_dir / "train_images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        image_id = f"digit_{index:04d}.png"
        gray = Image.fromarray((pixels * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
        gray = gray.resize((image_size, image_size), Image.Resampling.BICUBIC)
        gray.convert("RGB").save(images_dir / image_id, format="PNG", optimize=False)
        rows.append((image_id, int(label)))
    with (raw_dir / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "label"])
        writer.writerows(rows)
    label_map = {str(i): name for i, name in enumerate(DIGIT_NAMES)}
    (raw_dir / "label_map.json").write_text(json.dumps(label_map, indent=2) + "\n")


# --------------------------------------------------------------------------- folder
class FolderRow(NamedTuple):
    """One labelled image of a folder source, as `fetch` writes it to `train.csv`."""

    image_id: str  # the file's path below source.path (less image_suffix)
    label: str
    group: str  # "" = none
    split: str  # the owner's split ("train", "val", "test"), "" = none


def copy_folder(
    source: FolderSource, raw_dir: Path, progress: bool = True, root: Path | None = None
) -> None:
    """Link or copy a user's image tree into the common layout: `train.csv` (id, label, group,
    split) + `train_images/` + label map.

    Class-per-folder (`path/<class>/<file>`): the label is the sub-folder's name and the image
    id its path below `path`. Split folders (`path/train/<class>/<file>`, val, test; see
    `folder_rows`): the same, each image with its split. With `labels_csv`: the CSV's id and
    label columns (and group and split columns, when given) are kept; ids name files below
    `path` (plus `image_suffix`). Files the CSV names but the folder lacks are kept as rows, so
    `prepare` reports them as missing.
    """
    root = root or Path.cwd()
    folder = _resolve(source.path, root)
    if not folder.is_dir():
        raise FetchError(f"source.path: {folder} is not a folder")
    if source.labels_csv is None:
        _, rows = folder_rows(folder)
        suffix = ""
    else:
        rows = read_labels_csv(_resolve(source.labels_csv, root), source)
        suffix = source.image_suffix
    names = dict.fromkeys(row.image_id + suffix for row in rows)
    place_files(folder, raw_dir / "train_images", list(names), link=source.link_files)
    with (raw_dir / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "label", "group", "split"])
        writer.writerows(rows)
    labels = sorted({row.label for row in rows}, key=natural_key)
    label_map = {label: label for label in labels}
    (raw_dir / "label_map.json").write_text(json.dumps(label_map, indent=2) + "\n")


def place_files(folder: Path, target: Path, names: list[str], link: bool = True) -> None:
    """Put each file `folder/name` at `target/name`: a hard link where both are on one file
    system (a large folder is not stored twice), else a copy. Names that are no file are left
    out (`prepare` reports them as missing).

    A link is an ordinary file to DVC, which versions the snapshot as it would a copy; the
    user's file and the snapshot are one file from then on (`source.link_files`).
    """
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        origin = folder / name
        if not origin.is_file():
            continue
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        if link:
            try:
                os.link(origin, destination)
                continue
            except OSError as error:
                # Another file system (or no links there): copy this and every later file
                # rather than failing once per file. Other errors (a file owned by someone
                # else under fs.protected_hardlinks) fall back for that file only.
                link = error.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP)
        shutil.copyfile(origin, destination)


def folder_rows(folder: Path) -> tuple[str, list[FolderRow]]:
    """The labelled images of a tree, and its layout: "class-folders" or "split-folders".

    When every top-level folder is a split name (`labels.SPLIT_ALIASES`: train, val/valid/
    validation, test, any case), those are the owner's splits, each of class folders (the
    torchvision ImageFolder and timm layout) and the classes are the union of them. A class
    missing from val or test is fine; `prepare` says so when one has no training images.
    """
    top = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not top:
        raise FetchError(
            f"{folder} has no class sub-folders; put each class's images in <path>/<class>/ "
            "(or <path>/train/<class>/, <path>/test/<class>/) or give source.labels_csv"
        )
    splits = {name: split_name(name) or "" for name in top}
    if not any(splits.values()):
        rows = _class_rows(folder, folder, top, "")
        layout = "class-folders"
    else:
        _check_split_folders(folder, splits)
        rows = []
        for name in top:
            rows += _split_rows(folder, name, splits[name])
        layout = "split-folders"
    if not rows:
        raise FetchError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return layout, rows


def _check_split_folders(folder: Path, splits: dict[str, str]) -> None:
    """Either every top-level folder is a split or none is; each split is named once."""
    named = [name for name, split in splits.items() if split]
    others = [name for name, split in splits.items() if not split]
    if others:
        raise FetchError(
            f"{folder}: top-level folder(s) {', '.join(named)} are split names but "
            f"{', '.join(others)} are not. Split folders must hold every image "
            f"(<path>/train/<class>/, <path>/val/<class>/, <path>/test/<class>/): move "
            f"{', '.join(others)} into them; or, in a class-per-folder tree, rename the class "
            f"folder(s) {', '.join(named)} (e.g. {named[0]}_class), since {SPLIT_ALIASES_TEXT} "
            "name splits there"
        )
    seen: dict[str, str] = {}
    for name, split in splits.items():
        if split in seen:
            raise FetchError(
                f"{folder}: {seen[split]}/ and {name}/ both name the {split} split; merge them "
                "into one folder"
            )
        seen[split] = name


def _split_rows(folder: Path, name: str, split: str) -> list[FolderRow]:
    """The images of the split folder `folder/name`, one class folder each."""
    parent = folder / name
    classes = sorted(p.name for p in parent.iterdir() if p.is_dir())
    nested = [c for c in classes if split_name(c)]
    if nested:
        raise FetchError(
            f"{parent} holds class folder(s) named like splits ({', '.join(nested)}): the tree "
            f"looks nested one level too deep (e.g. {name}/{nested[0]}/<class>/); point "
            f"source.path at the folder whose sub-folders are train/, val/, test/, or rename "
            f"the class folder(s) ({SPLIT_ALIASES_TEXT} name splits)"
        )
    if not classes and any(p.is_file() for p in parent.iterdir()):
        # e.g. a competition's unlabelled test/ folder: there is no class to give its images.
        print(f"{parent}: no class folders, so its files are not used (they have no labels)")
    return _class_rows(folder, parent, classes, split)


def _class_rows(folder: Path, parent: Path, classes: list[str], split: str) -> list[FolderRow]:
    """The images below `parent/<class>/` (at any depth), ids relative to `folder`."""
    rows = []
    for name in classes:
        for file in sorted((parent / name).rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                rows.append(FolderRow(file.relative_to(folder).as_posix(), name, "", split))
    return rows


def read_labels_csv(csv_path: Path, source: FolderSource) -> list[FolderRow]:
    """The rows of a folder source's labels CSV (`source.labels_csv`), splits as the manifest
    names them."""
    if not csv_path.is_file():
        raise FetchError(f"source.labels_csv: {csv_path} does not exist")
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [source.id_column, source.label_column]
        columns += [c for c in (source.group_column, source.split_column) if c]
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise FetchError(
                f"{csv_path}: missing column(s) {', '.join(missing)}; found "
                f"{', '.join(reader.fieldnames or [])} (set source.id_column/label_column/"
                "group_column/split_column)"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            image_id = row[source.id_column].strip()
            if not _safe_relative(image_id + source.image_suffix):
                raise FetchError(f"{csv_path}: image id {image_id!r} leaves source.path")
            group = row[source.group_column].strip() if source.group_column else ""
            split = _csv_split(csv_path, line, image_id, row, source.split_column)
            rows.append(FolderRow(image_id, row[source.label_column].strip(), group, split))
    return rows


def _csv_split(
    csv_path: Path, line: int, image_id: str, row: dict[str, str], column: str | None
) -> str:
    if column is None:
        return ""
    value = (row[column] or "").strip()
    split = split_name(value)
    if split is None:
        raise FetchError(
            f"{csv_path}, line {line} ({image_id}): split {value!r} in column {column!r} is not "
            f"one of {SPLIT_ALIASES_TEXT}; fix the value, or drop source.split_column to let "
            "prepare split the images"
        )
    return split


def _safe_relative(name: str) -> bool:
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts
