"""`prepare`: validate every image, drop what cannot be used (saying why), split, write a manifest.

Outputs: `data/<name>/manifest.parquet` (one row per usable sample), `classes.json`,
`rejected.csv` and the metrics file `reports/<name>/data.json`.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from attnpipe.config import PrepareConfig, Recipe
from attnpipe.data import ray_tasks
from attnpipe.data.images import BadImage, ImageInfo, inspect
from attnpipe.data.layouts import RawIndex, RawRecord, read_layout
from attnpipe.errors import AttnpipeError
from attnpipe.paths import PipelinePaths

SPLITS = ("train", "val", "test")
SEQUENTIAL_BELOW = 64  # fewer images than this are scanned in-process: a pool costs more
SCAN_TASK_IMAGES = 64  # images per Ray task: enough to outweigh its scheduling cost

MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("path", pa.string()),  # relative to the project root
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("group", pa.string()),
        ("split", pa.string()),
        ("fold", pa.int32()),  # -1 = not in a fold (test split, or folds disabled)
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mode", pa.string()),
        ("format", pa.string()),
    ]
)


class PrepareError(AttnpipeError, ValueError):
    """The dataset cannot be prepared as the recipe asks; the message says what to fix."""


@dataclass(frozen=True)
class Sample:
    record: RawRecord
    label: int
    info: ImageInfo


@dataclass(frozen=True)
class Rejection:
    image_id: str
    path: str
    reason: str


@dataclass(frozen=True)
class PrepareResult:
    samples: int
    rejected: int
    duplicates: int
    report: dict


def prepare(
    recipe: Recipe, paths: PipelinePaths, progress: bool = True, address: str | None = None
) -> PrepareResult:
    """Run the whole stage for one pipeline and write its outputs.

    With `address`, the images are validated by Ray tasks on that cluster (see `ray_tasks`);
    the files written are the same, byte for byte.
    """
    config = recipe.prepare
    index = read_layout(recipe, paths.raw)
    labelled = _resolve_labels(index, origin=str(paths.raw))
    images = [record.path for record, _ in labelled]
    infos = scan_images(images, config.max_pixels, config.workers, progress, address)

    good: list[Sample] = []
    rejected: list[Rejection] = []
    for (record, label), info in zip(labelled, infos, strict=True):
        if isinstance(info, BadImage):
            rejected.append(Rejection(record.image_id, _rel(record.path, paths.root), info.reason))
        else:
            good.append(Sample(record, label, info))

    total = len(labelled)
    if total and len(rejected) / total > config.max_reject_fraction:
        _write_rejected(paths.rejected, rejected)
        raise PrepareError(
            f"{len(rejected)} of {total} images ({len(rejected) / total:.1%}) are unusable, more "
            f"than prepare.max_reject_fraction={config.max_reject_fraction:g}; see "
            f"{paths.rejected} for each file and reason, fix or remove them, or raise the limit"
        )

    kept, duplicates = _drop_duplicates(
        good, config.duplicates, official_test=config.test_split == "official"
    )
    rejected.extend(
        Rejection(dup.record.image_id, _rel(dup.record.path, paths.root), reason)
        for dup, reason in duplicates
    )

    official = None
    if config.test_split == "official":
        official = [s.record.split for s in kept]
        if "test" not in official:
            raise PrepareError(
                f"prepare.test_split is 'official' but {paths.raw} marks no image as test "
                "(the torchvision sources and the imagenet layout carry an official split); use "
                "'stratified'"
            )
    splits = assign_splits(
        labels=[s.label for s in kept],
        groups=[s.record.group for s in kept],
        ids=[s.record.image_id for s in kept],
        config=config,
        official=official,
    )
    folds = assign_folds(
        labels=[s.label for s in kept],
        groups=[s.record.group for s in kept],
        splits=splits,
        folds=config.folds,
        seed=config.seed,
    )

    _write_manifest(paths, kept, splits, folds, index.class_names)
    release(paths.classes)
    paths.classes.write_text(json.dumps({"classes": index.class_names}, indent=2) + "\n")
    _write_rejected(paths.rejected, rejected)
    report = data_report(
        kept, splits, index.class_names, len(rejected) - len(duplicates), len(duplicates)
    )
    paths.data_report.parent.mkdir(parents=True, exist_ok=True)
    paths.data_report.write_text(json.dumps(report, indent=2) + "\n")
    return PrepareResult(len(kept), len(rejected) - len(duplicates), len(duplicates), report)


# --------------------------------------------------------------------------- labels
def _resolve_labels(index: RawIndex, origin: str) -> list[tuple[RawRecord, int]]:
    by_value = {value: i for i, value in enumerate(index.label_values)}
    unknown = [
        (line, r) for line, r in enumerate(index.records, start=2) if r.label not in by_value
    ]
    if unknown:
        shown = ", ".join(f"line {line} ({r.image_id}: {r.label!r})" for line, r in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise PrepareError(
            f"{origin}: {len(unknown)} row(s) have labels outside the label map "
            f"{index.label_values}: {shown}{more}; fix the labels or the label map"
        )
    return [(r, by_value[r.label]) for r in index.records]


# --------------------------------------------------------------------------- scanning
def scan_images(
    paths: Sequence[Path],
    max_pixels: int,
    workers: int = 0,
    progress: bool = True,
    address: str | None = None,
) -> list[ImageInfo | BadImage]:
    """Decode every image in parallel processes, or as Ray tasks on the cluster at `address`.

    Each result is the image's facts or why it is bad.
    """
    workers = workers or os.cpu_count() or 1
    chunksize = max(1, min(64, len(paths) // (workers * 8) or 1))
    bar = tqdm(total=len(paths), desc="scan images", unit="img", disable=not progress)
    results: list[ImageInfo | BadImage] = []
    with bar:
        if address:
            return _scan_on_ray(paths, max_pixels, address, bar)
        if workers == 1 or len(paths) < SEQUENTIAL_BELOW:
            for path in paths:
                results.append(_scan_one(path, max_pixels))
                bar.update()
        else:
            with ProcessPoolExecutor(workers) as pool:
                jobs = pool.map(_scan_one, paths, [max_pixels] * len(paths), chunksize=chunksize)
                for result in jobs:
                    results.append(result)
                    bar.update()
    return results


def _scan_one(path: Path, max_pixels: int) -> ImageInfo | BadImage:
    try:
        return inspect(path, max_pixels)
    except BadImage as bad:
        return bad


def _scan_on_ray(
    paths: Sequence[Path], max_pixels: int, address: str, bar: tqdm
) -> list[ImageInfo | BadImage]:
    """Chunks of images as Ray tasks: their bytes go in, their facts (or reasons) come back.

    A file the driver cannot read is scanned here instead: it fails at reading, with the
    reason a local run gives.
    """
    chunks = [
        range(i, min(i + SCAN_TASK_IMAGES, len(paths)))
        for i in range(0, len(paths), SCAN_TASK_IMAGES)
    ]
    results: list[ImageInfo | BadImage | None] = [None] * len(paths)
    nodes = set()
    inputs = (([ray_tasks.read_or_none(paths[i]) for i in chunk], max_pixels) for chunk in chunks)
    for position, (infos, node) in ray_tasks.run_tasks(_scan_task, inputs, address):
        for i, info in zip(chunks[position], infos, strict=True):
            results[i] = info if info is not None else _scan_one(paths[i], max_pixels)
        bar.update(len(chunks[position]))
        nodes.add(node)
        ray_tasks.trace_task("scan", f"{chunks[position].start}-{chunks[position].stop}", node)
    bar.write(f"scanned {len(paths)} image(s) with Ray tasks on {len(nodes)} node(s) of {address}")
    return cast(list[ImageInfo | BadImage], results)  # every chunk answered: no None left


def _scan_task(
    blobs: list[bytes | None], max_pixels: int
) -> tuple[list[ImageInfo | BadImage | None], str]:
    """On a node: each image's bytes staged as a file and inspected as a local run does."""
    infos: list[ImageInfo | BadImage | None] = []
    with tempfile.TemporaryDirectory(prefix="attnpipe-scan-") as folder:
        staged = Path(folder) / "image"
        for blob in blobs:
            if blob is None:
                infos.append(None)  # the driver could not read it: it says why
                continue
            staged.write_bytes(blob)
            infos.append(_scan_one(staged, max_pixels))
    return infos, ray_tasks.node_id()


def _drop_duplicates(
    samples: list[Sample], policy: str, official_test: bool = False
) -> tuple[list[Sample], list[tuple[Sample, str]]]:
    """Keep the first (by id) of each set of byte-identical files; say why each other went.

    With `official_test`, the dataset's test images come first and are all kept: the test split
    stays exactly as published, and a training copy of a test image is dropped (it would leak).
    """

    def is_test(sample: Sample) -> bool:
        return official_test and sample.record.split == "test"

    first_by_hash: dict[str, Sample] = {}
    kept, duplicates = [], []
    for sample in sorted(samples, key=lambda s: (not is_test(s), s.record.image_id)):
        first = first_by_hash.setdefault(sample.info.sha256, sample)
        if first is sample or is_test(sample):
            kept.append(sample)
            continue
        reason = f"duplicate of {first.record.image_id}"
        if first.label != sample.label:
            reason += f" (labelled {sample.record.label!r} here, {first.record.label!r} there)"
        duplicates.append((sample, reason))
    if duplicates and policy == "error":
        shown = ", ".join(f"{d.record.image_id}: {reason}" for d, reason in duplicates[:10])
        raise PrepareError(
            f"{len(duplicates)} exact duplicate image(s): {shown}; remove them or set "
            f"prepare.duplicates: keep-first"
        )
    return kept, duplicates


# --------------------------------------------------------------------------- splitting
def split_counts(n: int, ratios: Sequence[float]) -> list[int]:
    """Largest-remainder rounding: each count within one of `n * ratio`, summing to `n`."""
    ideal = np.asarray(ratios, dtype=np.float64) * n
    counts = np.floor(ideal).astype(int)
    order = np.argsort(-(ideal - counts), kind="stable")
    for i in order[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def assign_splits(
    labels: Sequence[int],
    groups: Sequence[str | None],
    ids: Sequence[str],
    config: PrepareConfig,
    official: Sequence[str | None] | None = None,
) -> list[str]:
    """Stratified (by class) and, when groups are given, group-aware train/val/test split.

    Deterministic: depends only on the ids, labels, groups, ratios and seed, never on row order.
    With `official` (the dataset's own split per sample), its test samples are the test split
    and the others are split train/val in the ratio of `splits.train` to `splits.val`.
    """
    ratios = [config.splits.train, config.splits.val, config.splits.test]
    result = [""] * len(ids)
    if official is not None:
        for i, split in enumerate(official):
            if split == "test":
                result[i] = "test"
        total = config.splits.train + config.splits.val
        ratios = [config.splits.train / total, config.splits.val / total, 0.0]
    rng = np.random.default_rng(config.seed)
    order = sorted((i for i in range(len(ids)) if not result[i]), key=lambda i: ids[i])
    if any(groups[i] is not None for i in order):
        _group_split(labels, groups, order, ratios, rng, result)
        return result
    by_class: dict[int, list[int]] = defaultdict(list)
    for i in order:
        by_class[labels[i]].append(i)
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        start = 0
        for split, count in zip(SPLITS, split_counts(len(members), ratios), strict=True):
            for i in members[start : start + count]:
                result[i] = split
            start += count
    return result


def _group_split(
    labels: Sequence[int],
    groups: Sequence[str | None],
    order: Sequence[int],
    ratios: Sequence[float],
    rng: np.random.Generator,
    result: list[str],
) -> None:
    """Greedy: place whole groups, largest first, where their classes are most under target."""
    members: dict[str, list[int]] = defaultdict(list)
    for i in order:
        # A sample without a group is a group of its own.
        members[groups[i] if groups[i] is not None else f"\0{i}"].append(i)
    class_totals = Counter(labels[i] for i in order)
    targets = {
        c: np.asarray(ratios) * total for c, total in class_totals.items()
    }  # per class: ideal count per split
    filled = {c: np.zeros(len(ratios)) for c in class_totals}
    closed = np.asarray(ratios) <= 0  # a split with no share never receives a group
    names = sorted(members)
    rng.shuffle(names)  # random tie-break among groups of equal size
    names.sort(key=lambda name: -len(members[name]))
    for name in names:
        counts = Counter(labels[i] for i in members[name])
        deficit = sum(
            (targets[c] - filled[c]) / max(class_totals[c], 1) * k for c, k in counts.items()
        )
        choice = int(np.argmax(np.where(closed, -np.inf, deficit)))
        for c, k in counts.items():
            filled[c][choice] += k
        for i in members[name]:
            result[i] = SPLITS[choice]


def assign_folds(
    labels: Sequence[int],
    groups: Sequence[str | None],
    splits: Sequence[str],
    folds: int,
    seed: int,
) -> list[int]:
    """Stratified (group-aware when grouped) k-fold index for train+val samples; -1 elsewhere."""
    result = [-1] * len(labels)
    if folds < 2:
        return result
    pool = [i for i, s in enumerate(splits) if s in ("train", "val")]
    rng = np.random.default_rng(seed + 1)
    units: dict[tuple[int, str], list[int]] = defaultdict(list)
    for i in pool:
        # Round-robin over groups (or single samples) within each class.
        key = groups[i] if groups[i] is not None else f"\0{i}"
        units[(labels[i], key)].append(i)
    by_class: dict[int, list[list[int]]] = defaultdict(list)
    seen_groups: dict[str, int] = {}
    for (label, _key), idx in sorted(units.items()):
        by_class[label].append(idx)
    position = 0
    for label in sorted(by_class):
        unit_list = by_class[label]
        rng.shuffle(unit_list)
        for idx in unit_list:
            key = groups[idx[0]]
            fold = seen_groups.setdefault(key, position % folds) if key else position % folds
            for i in idx:
                result[i] = fold
            position += 1
    return result


# --------------------------------------------------------------------------- outputs
def _write_manifest(
    paths: PipelinePaths,
    samples: list[Sample],
    splits: list[str],
    folds: list[int],
    class_names: list[str],
) -> None:
    rows = sorted(zip(samples, splits, folds, strict=True), key=lambda t: t[0].record.image_id)
    columns = {
        "id": [s.record.image_id for s, _, _ in rows],
        "path": [_rel(s.record.path, paths.root) for s, _, _ in rows],
        "label": [s.label for s, _, _ in rows],
        "class_name": [class_names[s.label] for s, _, _ in rows],
        "group": [s.record.group for s, _, _ in rows],
        "split": [split for _, split, _ in rows],
        "fold": [fold for _, _, fold in rows],
        "sha256": [s.info.sha256 for s, _, _ in rows],
        "bytes": [s.info.bytes for s, _, _ in rows],
        "width": [s.info.width for s, _, _ in rows],
        "height": [s.info.height for s, _, _ in rows],
        "mode": [s.info.mode for s, _, _ in rows],
        "format": [s.info.format for s, _, _ in rows],
    }
    paths.manifest.parent.mkdir(parents=True, exist_ok=True)
    release(paths.manifest)
    table = pa.table(columns, schema=MANIFEST_SCHEMA)
    pq.write_table(table, paths.manifest, compression="zstd")


def read_manifest(path: Path) -> pa.Table:
    if not path.is_file():
        raise PrepareError(f"{path} is missing: run `attnpipe prepare` first")
    return pq.read_table(path)


def release(path: Path) -> None:
    """Remove an output before writing it anew. After `dvc repro` it may be a link to the one
    copy in DVC's cache (.dvc/config cache.type: hardlink or symlink); writing into it would
    change that copy (root ignores its read-only mode). A new file breaks the link instead."""
    path.unlink(missing_ok=True)


def _write_rejected(path: Path, rejected: list[Rejection]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    release(path)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "path", "reason"])
        for item in sorted(rejected, key=lambda r: r.image_id):
            writer.writerow([item.image_id, item.path, item.reason])


def data_report(
    samples: list[Sample],
    splits: list[str],
    class_names: list[str],
    rejected: int,
    duplicates: int,
) -> dict:
    per_split: dict[str, Counter] = {split: Counter() for split in SPLITS}
    for sample, split in zip(samples, splits, strict=True):
        per_split[split][class_names[sample.label]] += 1
    return {
        "samples": {split: sum(per_split[split].values()) for split in SPLITS},
        "per_class": {
            split: {name: per_split[split][name] for name in class_names} for split in SPLITS
        },
        "rejected": rejected,
        "duplicates": duplicates,
    }


def format_data_report(report: dict) -> str:
    """The per-split, per-class counts as a text table for the terminal."""
    classes = list(next(iter(report["per_class"].values())))
    width = max([len("class"), *map(len, classes)])
    lines = [f"{'class':<{width}} " + " ".join(f"{s:>7}" for s in SPLITS)]
    for name in classes:
        counts = " ".join(f"{report['per_class'][s][name]:>7}" for s in SPLITS)
        lines.append(f"{name:<{width}} {counts}")
    lines.append(f"{'total':<{width}} " + " ".join(f"{report['samples'][s]:>7}" for s in SPLITS))
    lines.append(f"rejected: {report['rejected']}   duplicates dropped: {report['duplicates']}")
    return "\n".join(lines)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)
