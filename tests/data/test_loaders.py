"""Loaders: every evaluation sample exactly once across ranks and workers; equal train batches."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from attnpipe.data.loaders import (
    ShardStream,
    build_transform,
    make_loader,
    split_info,
    steps_per_epoch,
)


def _stream(recipe, urls, rank, world, train):
    return ShardStream(
        urls=urls,
        rank=rank,
        world_size=world,
        transform=build_transform(recipe.augment, 32, train=train),
        train=train,
        seed=0,
        shuffle_buffer=64,
    )


@pytest.mark.parametrize("shard_subset", [None, 3])  # 4 shards >= 4 slots, and 3 < 4 slots
def test_two_ranks_two_workers_see_every_eval_sample_once(digits_project, shard_subset):
    recipe, paths = digits_project
    info = split_info(paths.shards, "test")
    urls = info.urls[:shard_subset] if shard_subset else info.urls
    expected = sum(
        e["samples"]
        for e in __import__("json").loads((paths.shards / "index.json").read_text())["splits"][
            "test"
        ]["shards"][: shard_subset or None]
    )
    seen: Counter[str] = Counter()
    for rank in range(2):
        loader = make_loader(_stream(recipe, urls, rank, 2, train=False), batch_size=16, workers=2)
        for images, labels, ids in loader:
            assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
            assert len(labels) == len(ids)
            seen.update(ids)
    assert sum(seen.values()) == expected  # nothing missing ...
    assert max(seen.values()) == 1  # ... and nothing doubled


def test_train_gives_equal_batch_counts_and_disjoint_ranks(digits_project):
    recipe, paths = digits_project
    info = split_info(paths.shards, "train")
    batch, world = 32, 2
    steps = steps_per_epoch(info.samples, world, batch)
    per_rank: list[set[str]] = []
    for rank in range(world):
        stream = _stream(recipe, info.urls, rank, world, train=True)
        stream.set_epoch(0)
        loader = make_loader(stream, batch_size=batch, workers=2)
        batches = [b for _, b in zip(range(steps), loader, strict=False)]
        assert len(batches) == steps
        assert all(len(b[1]) == batch for b in batches)
        per_rank.append({i for b in batches for i in b[2]})
    assert not per_rank[0] & per_rank[1]


def test_train_order_changes_with_the_epoch(digits_project):
    recipe, paths = digits_project
    info = split_info(paths.shards, "train")
    orders = []
    for epoch in (0, 0, 1):
        stream = _stream(recipe, info.urls, 0, 1, train=True)
        stream.set_epoch(epoch)
        ids = [b[2] for _, b in zip(range(3), make_loader(stream, 16, 0), strict=False)]
        orders.append(ids)
    assert orders[0] == orders[1]  # reproducible
    assert orders[0] != orders[2]  # reshuffled per epoch
