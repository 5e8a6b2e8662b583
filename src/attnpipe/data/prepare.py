"""`prepare`: validate every image, drop what cannot be used (saying why), split, write a manifest.

Outputs: `data/<name>/manifest.parquet` (one row per usable sample), `classes.json`,
`rejected.csv`, the metrics file `reports/<name>/data.json` (totals) and
`reports/<name>/class_counts.csv` (samples per class and split).
"""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attnpipe.config import PrepareConfig, Recipe
from attnpipe.data import ray_tasks
from attnpipe.data.layouts import RawIndex, RawRecord, read_layout
from attnpipe.data.scan import ScanFacts, SharedProject, scan_images, workspace_name
from attnpipe.data.split_check import split_problem
from attnpipe.errors import AttnpipeError
from attnpipe.paths import PipelinePaths

SPLITS = ("train", "val", "test")

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


@dataclass(frozen=True, slots=True)
class Sample:
    """A usable image: its record, class index, and its row in the scan's `ScanFacts`."""

    record: RawRecord
    label: int
    row: int


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
    recipe: Recipe,
    paths: PipelinePaths,
    progress: bool = True,
    address: str | None = None,
    shared_root: str | None = None,
) -> PrepareResult:
    """Run the whole stage for one pipeline and write its outputs.

    With `address`, the images are validated by Ray tasks on that cluster, each reading its
    images from the project folder as the nodes see it (`shared_root`, see `ray_tasks`); the
    files written are the same, byte for byte.
    """
    config = recipe.prepare
    index = read_layout(recipe, paths.raw)
    labels = _resolve_labels(index, origin=str(paths.raw))
    images = [record.location for record in index.records]
    shared = SharedProject(
        ray_tasks.shared_root(paths.root, shared_root),
        paths.root,
        workspace_name(paths.raw, paths.root),
    )
    facts = scan_images(images, config.max_pixels, config.workers, progress, address, shared)
    del images
    total = len(labels)
    good, rejected = _sort_out(index.records, labels, facts, paths.root)
    del labels
    if total and len(rejected) / total > config.max_reject_fraction:
        _write_rejected(paths.rejected, rejected)
        raise PrepareError(
            f"{len(rejected)} of {total} images ({len(rejected) / total:.1%}) are unusable, more "
            f"than prepare.max_reject_fraction={config.max_reject_fraction:g}; see "
            f"{paths.rejected} for each file and reason, fix or remove them, or raise the limit"
        )

    kept, duplicates = _drop_duplicates(
        good,
        config.duplicates,
        facts,
        official_test=config.test_split == "official" or index.keeps_splits,
        official_val=index.keeps_splits,
    )
    rejected.extend(
        Rejection(dup.record.image_id, workspace_name(dup.record.location, paths.root), reason)
        for dup, reason in duplicates
    )

    splits = _split(kept, index, config, paths.raw)
    folds = assign_folds(
        labels=[s.label for s in kept],
        groups=[s.record.group for s in kept],
        splits=splits,
        folds=config.folds,
        seed=config.seed,
    )

    _write_manifest(paths, kept, splits, folds, index.class_names, facts)
    release(paths.classes)
    paths.classes.write_text(json.dumps({"classes": index.class_names}, indent=2) + "\n")
    _write_rejected(paths.rejected, rejected)
    report = data_report(
        kept, splits, index.class_names, len(rejected) - len(duplicates), len(duplicates)
    )
    write_data_report(paths, report)
    return PrepareResult(len(kept), len(rejected) - len(duplicates), len(duplicates), report)


def _sort_out(
    records: list[RawRecord], labels: np.ndarray, facts: ScanFacts, root: Path
) -> tuple[list[Sample], list[Rejection]]:
    """The usable images, and why each other one is not."""
    good: list[Sample] = []
    rejected: list[Rejection] = []
    for row, (record, label) in enumerate(zip(records, labels.tolist(), strict=True)):
        if row in facts.bad:
            rejected.append(
                Rejection(record.image_id, workspace_name(record.location, root), facts.bad[row])
            )
        else:
            good.append(Sample(record, label, row))
    return good, rejected


# --------------------------------------------------------------------------- labels
def _resolve_labels(index: RawIndex, origin: str) -> np.ndarray:
    """Each record's class index (int32, in record order)."""
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
    return np.fromiter((by_value[r.label] for r in index.records), np.int32, len(index.records))


def _drop_duplicates(
    samples: list[Sample],
    policy: str,
    facts: ScanFacts,
    official_test: bool = False,
    official_val: bool = False,
) -> tuple[list[Sample], list[tuple[Sample, str]]]:
    """Keep the first (by id) of each set of byte-identical files; say why each other went.

    With `official_test`, the dataset's test images come first and are all kept: the test split
    stays exactly as published, and a training copy of a test image is dropped (it would leak).
    `official_val` does the same for the owner's validation images.
    """
    given = {"test"} if official_test else set()
    given |= {"val"} if official_val else set()

    def is_test(sample: Sample) -> bool:
        return sample.record.split in given

    first_by_hash: dict[bytes, Sample] = {}
    kept, duplicates = [], []
    for sample in sorted(samples, key=lambda s: (not is_test(s), s.record.image_id)):
        digest = facts.digests[32 * sample.row : 32 * sample.row + 32]
        first = first_by_hash.setdefault(digest, sample)
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
def _split(samples: list[Sample], index: RawIndex, config: PrepareConfig, raw: Path) -> list[str]:
    """Each sample's split, the owner's kept where there is one; checked (`split_check`)."""
    official = None
    if config.test_split == "official" or index.keeps_splits:
        official = [s.record.split for s in samples]
        if config.test_split == "official" and "test" not in official:
            raise PrepareError(
                f"prepare.test_split is 'official' but {raw} marks no image as test (the "
                "torchvision sources, the imagenet layout, and folder sources with a test/ "
                "folder or a split column carry an official split); use 'stratified'"
            )
    labels = [s.label for s in samples]
    splits = assign_splits(
        labels=labels,
        groups=[s.record.group for s in samples],
        ids=[s.record.image_id for s in samples],
        config=config,
        official=official,
    )
    problem = split_problem(
        labels, splits, official, index.class_names, config, keeps_splits=index.keeps_splits
    )
    if problem:
        raise PrepareError(problem)
    return splits


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
    With `official` (the dataset's own split per sample), its test and val samples keep their
    split, and the others are split between train and the splits it lacks, in the ratio of
    their `splits` shares: with an official test split, train/val as `splits.train` to
    `splits.val`; with official test and val, all the rest is train.
    """
    ratios = [config.splits.train, config.splits.val, config.splits.test]
    result = [""] * len(ids)
    if official is not None:
        given = {"val", "test"} & set(official)
        for i, split in enumerate(official):
            if split in given:
                result[i] = split
        ratios = [0.0 if s in given else r for s, r in zip(SPLITS, ratios, strict=True)]
        total = sum(ratios)
        ratios = [r / total for r in ratios]
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
MANIFEST_ROW_GROUP = 16_384  # rows per Parquet row group: what prepare holds of the manifest


def _write_manifest(
    paths: PipelinePaths,
    samples: list[Sample],
    splits: list[str],
    folds: list[int],
    class_names: list[str],
    facts: ScanFacts,
) -> None:
    """Sorted by id, one row group at a time: a group's Python lists and Arrow arrays live only
    until it is written, so what this holds does not grow with the dataset."""
    order = sorted(range(len(samples)), key=lambda i: samples[i].record.image_id)
    paths.manifest.parent.mkdir(parents=True, exist_ok=True)
    release(paths.manifest)
    with pq.ParquetWriter(paths.manifest, MANIFEST_SCHEMA, compression="zstd") as writer:
        for start in range(0, len(order) or 1, MANIFEST_ROW_GROUP):
            group = order[start : start + MANIFEST_ROW_GROUP]
            writer.write_table(
                _manifest_rows(group, paths.root, samples, splits, folds, class_names, facts)
            )


def _manifest_rows(
    order: list[int],
    root: Path,
    samples: list[Sample],
    splits: list[str],
    folds: list[int],
    class_names: list[str],
    facts: ScanFacts,
) -> pa.Table:
    """The manifest's rows for `order` (indices into `samples`), one column at a time."""
    rows = np.array([samples[i].row for i in order], dtype=np.int64)
    sizes = facts.sizes.reshape(-1, 3)[rows]
    columns: dict[str, Callable[[], Any]] = {
        "id": lambda: [samples[i].record.image_id for i in order],
        "path": lambda: [workspace_name(samples[i].record.location, root) for i in order],
        "label": lambda: [samples[i].label for i in order],
        "class_name": lambda: [class_names[samples[i].label] for i in order],
        "group": lambda: [samples[i].record.group for i in order],
        "split": lambda: [splits[i] for i in order],
        "fold": lambda: [folds[i] for i in order],
        "sha256": lambda: [facts.sha256(row) for row in rows],
        "bytes": lambda: sizes[:, 2],
        "width": lambda: sizes[:, 0],
        "height": lambda: sizes[:, 1],
        "mode": lambda: [facts.modes[row] for row in rows],
        "format": lambda: [facts.formats[row] for row in rows],
    }
    arrays = [pa.array(columns[f.name](), type=f.type) for f in MANIFEST_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=MANIFEST_SCHEMA)


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


def write_data_report(paths: PipelinePaths, report: dict) -> None:
    """`data.json`, DVC metrics: the totals only. The per-class counts go to
    `class_counts.csv` (class, then a column per split), a plain output: as metrics they were a
    column each in `dvc metrics show` and `dvc exp show` (3 x 1,000 for ImageNet)."""
    paths.data_report.parent.mkdir(parents=True, exist_ok=True)
    totals = {key: value for key, value in report.items() if key != "per_class"}
    paths.data_report.write_text(json.dumps(totals, indent=2) + "\n")
    release(paths.class_counts)
    with paths.class_counts.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", *SPLITS])
        for name in next(iter(report["per_class"].values())):
            writer.writerow([name, *(report["per_class"][split][name] for split in SPLITS)])


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
