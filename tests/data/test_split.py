"""Splits are stratified within one sample, group-aware, and independent of row order."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from attnpipe.config import PrepareConfig, SplitRatios
from attnpipe.data.prepare import SPLITS, assign_folds, assign_splits, split_counts


def _config(train=0.7, val=0.1, test=0.2, seed=0) -> PrepareConfig:
    return PrepareConfig(splits=SplitRatios(train=train, val=val, test=test), seed=seed)


@pytest.mark.parametrize("n", [0, 1, 7, 10, 101, 1000])
def test_split_counts_sum_and_stay_within_one(n):
    ratios = [0.7, 0.1, 0.2]
    counts = split_counts(n, ratios)
    assert sum(counts) == n
    assert all(abs(c - r * n) < 1 for c, r in zip(counts, ratios, strict=True))


def test_each_class_share_within_one_sample_of_ideal():
    rng = random.Random(3)
    # Imbalanced like cassava: one class dominates, one is rare.
    sizes = {0: 53, 1: 107, 2: 600, 3: 11, 4: 129}
    labels = [c for c, n in sizes.items() for _ in range(n)]
    ids = [f"img{i:05d}" for i in range(len(labels))]
    order = list(range(len(labels)))
    rng.shuffle(order)
    splits = assign_splits(
        [labels[i] for i in order], [None] * len(order), [ids[i] for i in order], _config()
    )
    by_class = Counter((labels[i], s) for i, s in zip(order, splits, strict=True))
    for c, n in sizes.items():
        for split, ratio in zip(SPLITS, (0.7, 0.1, 0.2), strict=True):
            assert abs(by_class[(c, split)] - ratio * n) <= 1, (c, split)


def test_split_ignores_row_order_and_follows_seed():
    labels = [i % 4 for i in range(200)]
    ids = [f"s{i}" for i in range(200)]
    groups = [None] * 200
    first = dict(zip(ids, assign_splits(labels, groups, ids, _config()), strict=True))
    reversed_ids = ids[::-1]
    again = dict(
        zip(reversed_ids, assign_splits(labels[::-1], groups, reversed_ids, _config()), strict=True)
    )
    assert first == again
    other_seed = dict(zip(ids, assign_splits(labels, groups, ids, _config(seed=1)), strict=True))
    assert other_seed != first


def test_group_aware_split_shares_no_group_and_stays_near_ratios():
    rng = random.Random(0)
    labels, groups, ids = [], [], []
    for patient in range(300):
        for image in range(rng.randint(1, 6)):
            labels.append(1 if rng.random() < 0.1 else 0)
            groups.append(f"patient{patient}")
            ids.append(f"p{patient}_{image}")
    splits = assign_splits(labels, groups, ids, _config())
    split_of_group: dict[str, set[str]] = {}
    for group, split in zip(groups, splits, strict=True):
        split_of_group.setdefault(group, set()).add(split)
    assert all(len(s) == 1 for s in split_of_group.values())
    share = Counter(splits)
    assert abs(share["train"] / len(ids) - 0.7) < 0.05
    assert abs(share["test"] / len(ids) - 0.2) < 0.05
    positives = Counter(s for s, y in zip(splits, labels, strict=True) if y == 1)
    assert all(positives[s] > 0 for s in SPLITS)


def test_folds_are_stratified_and_keep_groups_together():
    labels = [i % 3 for i in range(90)]
    groups = [f"g{i // 3}" for i in range(90)]
    splits = ["train"] * 60 + ["val"] * 15 + ["test"] * 15
    folds = assign_folds(labels, groups, splits, folds=5, seed=0)
    assert all(f == -1 for f, s in zip(folds, splits, strict=True) if s == "test")
    assert {f for f, s in zip(folds, splits, strict=True) if s != "test"} == set(range(5))
    by_group: dict[str, set[int]] = {}
    for g, f in zip(groups, folds, strict=True):
        by_group.setdefault(g, set()).add(f)
    assert all(len(v) == 1 for v in by_group.values())


def test_official_test_split_is_kept_and_the_rest_stratified_within_one():
    rng = random.Random(5)
    labels = [rng.randrange(4) for _ in range(400)]
    ids = [f"s{i:04d}" for i in range(400)]
    official = ["test" if i % 5 == 0 else "train" for i in range(400)]
    config = _config(train=0.8, val=0.2, test=0.0)
    splits = assign_splits(labels, [None] * 400, ids, config, official=official)
    assert [s == "test" for s in splits] == [o == "test" for o in official]
    rest = Counter((y, s) for y, s, o in zip(labels, splits, official, strict=True) if o != "test")
    for c in range(4):
        n = rest[(c, "train")] + rest[(c, "val")]
        assert abs(rest[(c, "train")] - 0.8 * n) <= 1 and abs(rest[(c, "val")] - 0.2 * n) <= 1


def test_grouped_samples_never_land_in_a_split_with_no_share():
    labels = [i % 2 for i in range(120)]
    groups = [f"g{i // 3}" for i in range(120)]
    official = ["test" if i < 30 else "train" for i in range(120)]
    splits = assign_splits(
        labels, groups, [f"{i:03d}" for i in range(120)], _config(0.9, 0.1, 0.0), official
    )
    assert splits.count("test") == 30 and splits[:30] == ["test"] * 30


def _write_melanoma(raw: Path, patients: int = 160, seed: int = 1) -> None:
    """marking.csv + the nested image folder, as in the Kaggle dataset (tiny unique JPEGs)."""
    from PIL import Image

    rng = random.Random(seed)
    folder = raw / "512x512-dataset-melanoma" / "512x512-dataset-melanoma"
    folder.mkdir(parents=True)
    rows = ["image_id,patient_id,target,source,sex,age_approx,anatom_site_general_challenge"]
    index = 0
    for patient in range(patients):
        sick = rng.random() < 0.25  # melanoma runs in some patients' images
        for _ in range(rng.randint(1, 5)):
            image_id = f"ISIC_{index:07d}"
            target = int(sick and rng.random() < 0.5)
            # ISIC 2019 rows have no patient: an empty id is a group of its own.
            patient_id = f"IP_{patient:05d}" if patient % 10 else ""
            rows.append(f"{image_id},{patient_id},{target},ISIC20,female,50.0,torso")
            pixels = np.random.default_rng(index).integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{image_id}.jpg", quality=95)
            index += 1
    (raw / "marking.csv").write_text("\n".join(rows) + "\n")


def test_melanoma_layout_split_keeps_patients_together_and_classes_balanced(tmp_path: Path):
    from attnpipe.config import parse_recipe
    from attnpipe.data.prepare import prepare
    from attnpipe.paths import PipelinePaths

    paths = PipelinePaths(tmp_path, "melanoma")
    _write_melanoma(paths.raw)
    recipe = parse_recipe(
        {
            "source": {"kind": "kaggle-dataset", "dataset": "shonenkov/melanoma-x"},
            "prepare": {"folds": 4, "seed": 3},
            "model": {"name": "attnvgg16"},
        },
        name="melanoma",
    )
    prepare(recipe, paths, progress=False)
    rows = pq.read_table(paths.manifest).to_pylist()
    assert len(rows) > 400 and not paths.rejected.read_text().strip().count("\n")
    assert {r["class_name"] for r in rows} == {"benign", "melanoma"}

    grouped = [r for r in rows if r["group"] is not None]
    assert len(grouped) < len(rows)  # some rows had no patient id
    split_of: dict[str, set[str]] = {}
    fold_of: dict[str, set[int]] = {}
    for r in grouped:
        split_of.setdefault(r["group"], set()).add(r["split"])
        fold_of.setdefault(r["group"], set()).add(r["fold"])
    assert all(len(s) == 1 for s in split_of.values())  # a patient never straddles splits
    assert all(len(f) == 1 for f in fold_of.values())  # ... nor folds

    total = Counter(r["label"] for r in rows)
    for split, ratio in zip(SPLITS, (0.7, 0.1, 0.2), strict=True):
        in_split = Counter(r["label"] for r in rows if r["split"] == split)
        for label, n in total.items():
            # Whole patients (up to 5 images) move together, so one sample is not guaranteed in
            # general; the greedy fill with the single-image patients reaches it on this data.
            assert abs(in_split[label] - ratio * n) <= 1, (split, label, in_split[label], n)
