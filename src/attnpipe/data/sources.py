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
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from attnpipe.config import FolderSource, Recipe, SklearnDigitsSource
from attnpipe.data.labels import natural_key
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
def copy_folder(
    source: FolderSource, raw_dir: Path, progress: bool = True, root: Path | None = None
) -> None:
    """Copy a user's image tree into the common layout: `train.csv` + `train_images/` + label map.

    Class-per-folder (`path/<class>/<file>`): the label is the sub-folder's name and the image
    id its path below `path`. With `labels_csv`: the CSV's id and label columns (and group
    column, when given) are kept; ids name files below `path` (plus `image_suffix`). Files the
    CSV names but the folder lacks are kept as rows, so `prepare` reports them as missing.
    """
    root = root or Path.cwd()
    folder = _resolve(source.path, root)
    if not folder.is_dir():
        raise FetchError(f"source.path: {folder} is not a folder")
    images_dir = raw_dir / "train_images"
    rows: list[tuple[str, str, str]] = []
    if source.labels_csv is None:
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not classes:
            raise FetchError(
                f"{folder} has no class sub-folders; put each class's images in <path>/<class>/ "
                "or give source.labels_csv"
            )
        for name in classes:
            for file in sorted((folder / name).rglob("*")):
                if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                    rows.append((file.relative_to(folder).as_posix(), name, ""))
        if not rows:
            raise FetchError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    else:
        rows = _read_labels_csv(_resolve(source.labels_csv, root), source)
    seen: set[str] = set()
    for image_id, _, _ in rows:
        file_name = image_id + source.image_suffix if source.labels_csv else image_id
        if file_name in seen:
            continue
        seen.add(file_name)
        origin = folder / file_name
        if origin.is_file():
            destination = images_dir / file_name
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(origin, destination)
    images_dir.mkdir(parents=True, exist_ok=True)
    with (raw_dir / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "label", "group"])
        writer.writerows(rows)
    labels = sorted({label for _, label, _ in rows}, key=natural_key)
    label_map = {label: label for label in labels}
    (raw_dir / "label_map.json").write_text(json.dumps(label_map, indent=2) + "\n")


def _read_labels_csv(csv_path: Path, source: FolderSource) -> list[tuple[str, str, str]]:
    if not csv_path.is_file():
        raise FetchError(f"source.labels_csv: {csv_path} does not exist")
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [source.id_column, source.label_column]
        if source.group_column:
            columns.append(source.group_column)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise FetchError(
                f"{csv_path}: missing column(s) {', '.join(missing)}; found "
                f"{', '.join(reader.fieldnames or [])} (set source.id_column/label_column)"
            )
        rows = []
        for row in reader:
            image_id = row[source.id_column].strip()
            if not _safe_relative(image_id + source.image_suffix):
                raise FetchError(f"{csv_path}: image id {image_id!r} leaves source.path")
            group = row[source.group_column].strip() if source.group_column else ""
            rows.append((image_id, row[source.label_column].strip(), group))
    return rows


def _safe_relative(name: str) -> bool:
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts
