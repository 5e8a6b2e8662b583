"""Splits are stratified within one sample, group-aware, and independent of row order."""

from __future__ import annotations

import random
from collections import Counter

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
