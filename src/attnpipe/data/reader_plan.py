"""The reader plan: which samples of which shards each reader (rank, DataLoader worker) reads
in an epoch (the rules are in `attnpipe.data.loaders`' docstring)."""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    """Samples `start` to `stop - 1` (tar order) of shard number `shard` of the split."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class ReaderPlan:
    """One epoch's work: a run of samples for each reader, `reader = rank * workers + worker`.

    `batch_size` is the training batch (smaller than asked only for a split with fewer samples
    than world_size x batch_size); `skipped` counts the training samples left out this epoch.
    """

    readers: tuple[tuple[Segment, ...], ...]
    workers: int
    batch_size: int
    skipped: int

    def segments(self, rank: int, worker: int) -> tuple[Segment, ...]:
        return self.readers[rank * self.workers + worker]

    def samples(self, reader: int) -> int:
        return sum(s.stop - s.start for s in self.readers[reader])

    def batches(self, rank: int) -> int:
        """Batches a rank's loader yields: each DataLoader worker batches its own samples."""
        first = rank * self.workers
        return sum(
            math.ceil(self.samples(r) / self.batch_size) for r in range(first, first + self.workers)
        )


def train_batches(samples: int, world_size: int, batch_size: int) -> tuple[int, int]:
    """(batch size, batches per rank) of a training epoch: whole batches, the same on every rank.

    With fewer than world_size x batch_size samples, each rank gets one smaller batch.
    """
    if samples < world_size:
        raise ValueError(
            f"the training split has {samples} samples, fewer than the {world_size} ranks: "
            "train on fewer workers or give the training split more samples"
        )
    if samples < world_size * batch_size:
        return samples // world_size, 1
    return batch_size, samples // (world_size * batch_size)


def batches_taken(steps: int, workers: int, worker: int) -> int:
    """How many of a rank's first `steps` training batches came from its reader `worker`.

    The DataLoader asks its workers round robin, worker 0 first, and a rank's readers hold
    whole batches, the first ones one more when they do not share evenly: batch j of the
    epoch is batch j // workers of reader j % workers.
    """
    return max(0, -(-(steps - worker) // workers))


def steps_per_epoch(samples: int, world_size: int, batch_size: int) -> int:
    """Batches every rank takes per epoch: one pass over the data in total (at least 1)."""
    return max(1, samples // (world_size * batch_size))


def plan_readers(
    counts: Sequence[int],
    world_size: int,
    workers: int,
    batch_size: int,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
) -> ReaderPlan:
    """Deal an epoch's samples (`counts`: samples per shard) to world_size x workers readers.

    Training: shards in an order drawn from (seed, epoch), laid end to end in a ring, cut from a
    point drawn likewise into ranges of whole batches (every rank `train_batches`' count, split
    over its workers as evenly as possible); the rest of the ring (fewer than
    world_size x batch_size samples) is skipped. Evaluation: shards in index order, cut into
    ranges as equal as possible, nothing skipped. Every rank computes the same plan.
    """
    if world_size < 1 or workers < 1 or batch_size < 1:
        raise ValueError(
            f"world_size, workers and batch_size must be >= 1: {world_size, workers, batch_size}"
        )
    total = sum(counts)
    readers = world_size * workers
    if train:
        batch, steps = train_batches(total, world_size, batch_size)
        per_worker = [(steps // workers + (w < steps % workers)) * batch for w in range(workers)]
        sizes = per_worker * world_size
        rng = np.random.default_rng([seed, epoch])
        order = [int(i) for i in rng.permutation(len(counts))]
        begin = int(rng.integers(total))
    else:
        batch = batch_size
        sizes = [total // readers + (r < total % readers) for r in range(readers)]
        order, begin = list(range(len(counts))), 0
    ranges = []
    for size in sizes:
        ranges.append(_cut_ring(order, counts, begin, size))
        begin += size
    return ReaderPlan(tuple(ranges), workers, batch, total - sum(sizes))


def _cut_ring(
    order: Sequence[int], counts: Sequence[int], begin: int, size: int
) -> tuple[Segment, ...]:
    """`size` samples from position `begin` of the shards laid end to end in `order`, wrapping
    around at the end, as one segment per shard touched."""
    starts = list(itertools.accumulate((counts[i] for i in order), initial=0))
    total = starts[-1]
    segments = []
    position = begin % total if total else 0
    while size > 0:
        slot = bisect.bisect_right(starts, position) - 1  # the shard holding `position`
        within = position - starts[slot]
        take = min(size, counts[order[slot]] - within)
        segments.append(Segment(order[slot], within, within + take))
        size -= take
        position = (position + take) % total
    return tuple(segments)
