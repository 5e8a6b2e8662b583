"""Streaming loaders over WebDataset shards for training and evaluation.

Work is divided among *readers*, one per (rank, DataLoader worker). Each epoch a reader plan
(`plan_readers`) lays the split's shards end to end (training: in an order drawn from the seed
and the epoch; evaluation: index order) and cuts that run of samples into one contiguous range
per reader, rank by rank. A reader seeks to the first sample of its range in each shard it
touches (the byte offsets are in `index.json`) and stops after its last one, so it reads its
share of the bytes and no more, however many readers share a shard: 64 readers over 18 shards
each read about 1/64 of the data. (More shards than readers is no longer needed; with many
readers per shard every shard is opened by several readers, each for its own byte range.)

Training: every rank takes the same number of batches, `steps = samples // (world_size x
batch_size)` (at least 1), and each reader gets a whole number of them (a rank's batches split
over its DataLoader workers as evenly as possible), so a rank yields exactly `steps` full
batches and DDP never waits on a rank that ran dry. The rule: **each epoch every training
sample is seen at most once; fewer than world_size x batch_size are skipped, chosen anew each
epoch; none repeats.** (The skipped ones are a run of consecutive samples starting at a point
drawn with the shard order.) A split with fewer samples than world_size x batch_size gives every
rank one smaller batch of `samples // world_size`; one with fewer samples than ranks is an
error. A training stream yields exactly its allotment, then ends.

Evaluation: every sample exactly once across all readers (ranges as equal as possible).

Training augmentation draws its random numbers from a seed of its own per sample, a function
of (seed, epoch, rank, reader, the sample's place in the reader's stream): whichever process
reads it, in whichever attempt, a sample gets the same crop and flips. A run resumed in the
middle of an epoch (`set_epoch(epoch, skip_batches)`) therefore continues that epoch exactly:
each reader leaves out the samples its rank already trained on (read, not decoded) and the
rest come in the order, and with the augmentation, of the uninterrupted epoch, as long as
the number of ranks and of loader workers is the same.
"""

from __future__ import annotations

import itertools
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from attnpipe.data.device_batches import (
    Batch,
    FloatBatchPool,
    _Collate,
    _DeviceBatches,
    _HostBatches,
    normalize_on_device,
)
from attnpipe.data.reader_plan import (
    ReaderPlan,
    Segment,
    batches_taken,
    plan_readers,
    steps_per_epoch,
    train_batches,
)
from attnpipe.data.shard_index import ShardEntry, SplitInfo, shard_entries, split_info
from attnpipe.data.tar_reader import (
    ShardFormatError,
    _group_samples,
    iter_tar_members,
    iter_tar_samples,
    open_shard,
)
from attnpipe.data.transforms import ImageTransform, build_transform, decode_sample

# The loaders' public names, wherever they now live (callers import them from here).
__all__ = [
    "Batch",
    "FloatBatchPool",
    "ImageTransform",
    "ReaderPlan",
    "Segment",
    "ShardEntry",
    "ShardFormatError",
    "ShardLoader",
    "ShardStream",
    "SplitInfo",
    "buffer_shuffle",
    "build_transform",
    "decode_sample",
    "iter_tar_samples",
    "make_loader",
    "normalize_on_device",
    "plan_readers",
    "read_samples",
    "shard_entries",
    "split_info",
    "steps_per_epoch",
    "train_batches",
]


def read_samples(shard: ShardEntry, start: int, stop: int) -> Iterator[dict[str, Any]]:
    """Samples `start` to `stop - 1` of a shard, reading only their bytes.

    Without offsets (an older index) the shard is read from its start and the samples before
    `start` are skipped.
    """
    if start >= stop:
        return
    shard = shard.with_offsets()  # a compact index: this shard's side file, and no other
    if shard.offsets is None:
        stream, length, skip, last = open_shard(shard.url), None, start, stop
    else:
        first, end = shard.byte_range(start, stop)
        length = None if end is None else end - first
        # The whole range is read, so that a shard that does not match its index is noticed.
        stream, skip, last = open_shard(shard.url, first, end), 0, None
    count = 0
    advice = "re-run `attnpipe shard` (and publish again)"
    with closing(stream):
        samples = _group_samples(iter_tar_members(stream, shard.url, length), shard.url)
        try:
            for sample in itertools.islice(samples, skip, last):
                count += 1
                yield sample
        except ShardFormatError as error:
            if shard.offsets is None:
                raise
            raise ShardFormatError(
                f"{error}, at an offset index.json gives: the shard and its index may not "
                f"match; {advice}"
            ) from None
    if count != stop - start:
        raise ShardFormatError(
            f"{shard.url}: read {count} samples where index.json gives {stop - start}: the "
            f"shard and its index do not match; {advice}"
        )


class ShardStream(IterableDataset):
    """The samples of one split for one rank, read by this process's DataLoader workers.

    Yields (image, label, sample id): each reader (rank, worker) its range of the epoch's
    `plan`, training ranges buffer-shuffled (seeded by seed, epoch and reader). `shards` come
    from `split_info(...).shards`; `urls=` (shard URLs) is accepted too and looks the shards up
    in the `index.json` beside them.

    The epoch (and the batches to skip of it) lives in shared memory: DataLoader workers hold
    a copy of the stream made when they started, and persistent workers must still see
    `set_epoch` of later epochs.
    """

    def __init__(
        self,
        shards: Sequence[ShardEntry] | None = None,
        *,
        rank: int,
        world_size: int,
        transform: Callable,
        train: bool,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        epoch: int = 0,
        urls: Sequence[str] | None = None,
    ):
        if (shards is None) == (urls is None):
            raise ValueError("give ShardStream either shards (split_info(...).shards) or urls")
        self.shards = list(shards) if shards is not None else shard_entries(urls or [])
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of the {world_size} ranks")
        self.rank, self.world_size = rank, world_size
        self.transform, self.train = transform, train
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self._epoch = torch.tensor(epoch, dtype=torch.int64).share_memory_()
        self._skip = torch.zeros((), dtype=torch.int64).share_memory_()
        if train:
            train_batches(self.samples_total, world_size, 1)  # fails early on too few samples
        if not all(s.has_offsets for s in self.shards):
            warnings.warn(
                "index.json has no sample offsets (written by an older attnpipe): every reader "
                "reads its shards from the start; re-run `attnpipe shard` to read only shares",
                stacklevel=2,
            )

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.shards]

    @property
    def samples_total(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @property
    def skip_batches(self) -> int:
        return int(self._skip)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """The epoch the next iteration reads; `skip_batches`: batches of it this rank has
        trained on already (a resume from a mid-epoch checkpoint), left out (training only)."""
        self._epoch.fill_(epoch)
        self._skip.fill_(skip_batches if self.train else 0)

    def plan(self, workers: int = 1, batch_size: int = 1, epoch: int | None = None) -> ReaderPlan:
        """Every reader's share of `epoch` (default: the current one) for this many DataLoader
        workers per rank and this batch size."""
        return plan_readers(
            [s.samples for s in self.shards],
            self.world_size,
            max(1, workers),
            batch_size,
            self.train,
            self.seed,
            self.epoch if epoch is None else epoch,
        )

    def __iter__(self) -> Iterator[tuple]:
        return self.samples(normalize=True)

    def samples(
        self,
        normalize: bool = True,
        batch_size: int = 1,
        worker: int | None = None,
        workers: int | None = None,
    ) -> Iterator[tuple]:
        """(image, label, id) of one reader: this process's DataLoader worker unless `worker`
        and `workers` are given. Training shares are whole batches of `batch_size`, less the
        batches `set_epoch` said to skip. `normalize=False` leaves images uint8 (augmented
        only), for `make_loader`."""
        info = get_worker_info()
        skip_batches = self.skip_batches
        if worker is None or workers is None:
            workers, worker = (info.num_workers, info.id) if info else (1, 0)
            # The DataLoader asks worker 0 first: after `skip_batches` batches the reader
            # whose batch comes next is `skip_batches % workers`, so worker 0 reads for it.
            worker = (worker + skip_batches) % workers
        # Samples are already in uint8; extra intra-op threads per loader worker only contend.
        if info is not None:
            torch.set_num_threads(1)
        epoch = self.epoch
        plan = self.plan(workers, batch_size, epoch)
        samples = self.read(plan.segments(self.rank, worker))
        transform = self.transform if normalize else self.transform.augment
        if not self.train:
            for sample in samples:
                image, label, meta = decode_sample(sample)
                yield transform(image), label, meta["id"]
            return
        reader = self.rank * workers + worker
        rng = np.random.default_rng([self.seed, epoch, reader])
        samples = buffer_shuffle(samples, self.shuffle_buffer, rng)
        seeds = augment_seeds(self.seed, epoch, self.rank, worker, plan.samples(reader))
        if info is not None:  # nothing of ours draws from them: in case a transform does
            _seed_libraries(self.seed, epoch, self.rank, worker)
        skip = batches_taken(skip_batches, workers, worker) * plan.batch_size
        # Trained on before a resume: read (the shuffle needs them) but never decoded.
        for index, sample in enumerate(itertools.islice(samples, skip, None), start=skip):
            image, label, meta = decode_sample(sample)
            # In a loader worker nothing else draws from torch's generator; in the training
            # process it is the loop's (MixUp, dropout...), so it is put back after each image.
            yield seeded(transform, image, int(seeds[index]), keep=info is None), label, meta["id"]

    def read(self, segments: Iterable[Segment]) -> Iterator[dict[str, Any]]:
        """The raw samples of `segments`, in order."""
        for segment in segments:
            yield from read_samples(self.shards[segment.shard], segment.start, segment.stop)


def augment_seeds(seed: int, epoch: int, rank: int, worker: int, count: int) -> np.ndarray:
    """The augmentation seed of each of a training reader's `count` samples, in stream order:
    a function of (seed, epoch, rank, reader) alone, so every attempt of a run draws the same
    ones (a fresh generator per attempt replayed epoch 0's numbers in the first epoch after a
    resume)."""
    # The trailing 1 keeps these apart from the shuffle's generator, seeded [seed, epoch, reader].
    return np.random.default_rng([seed, epoch, rank, worker, 1]).integers(2**63, size=count)


def seeded(transform: Callable, image: torch.Tensor, seed: int, keep: bool) -> torch.Tensor:
    """`transform(image)` with torch's generator seeded with `seed`; `keep`: the generator's
    state is put back afterwards."""
    generator = torch.default_generator
    before = generator.get_state() if keep else None
    generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed also queues CUDA's
    try:
        return transform(image)
    finally:
        if before is not None:
            generator.set_state(before)


def _seed_libraries(seed: int, epoch: int, rank: int, worker: int) -> None:
    """Python's and numpy's global generators of a loader worker, from (seed, epoch, rank,
    worker) rather than from the DataLoader's per-attempt base seed."""
    state = np.random.SeedSequence([seed, epoch, rank, worker, 2]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))


def buffer_shuffle(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Approximate shuffle of a stream with a buffer of `size` samples."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = int(rng.integers(len(buffer)))
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


class _Unnormalized(IterableDataset):
    """What a loader's workers run: one reader's share of `stream` as augmented uint8 images,
    in whole training batches of `batch_size` (the same stream object, so its epoch and
    settings are whatever they are when an iterator starts)."""

    def __init__(self, stream: ShardStream, batch_size: int):
        self.stream, self.batch_size = stream, batch_size

    def __iter__(self) -> Iterator[tuple]:
        return self.stream.samples(normalize=False, batch_size=self.batch_size)


class ShardLoader:
    """Batches (images, labels, ids) of a `ShardStream`: images normalised float32 on `device`
    in `memory_format`, labels int64 on `device`, ids a list of str.

    One loader serves every epoch: call `stream.set_epoch(e)` before iterating it. `len()` is
    the number of batches this rank gets in the stream's current epoch (training: the same on
    every rank), less those `set_epoch` skips. `dataloader` is the underlying torch DataLoader
    (its workers send uint8).
    """

    def __init__(
        self,
        stream: ShardStream,
        batch_size: int,
        workers: int = 0,
        device: torch.device | str = "cpu",
        memory_format: torch.memory_format = torch.contiguous_format,
        persistent: bool = False,
        generator: torch.Generator | None = None,
    ):
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"make_loader: device {self.device} is not supported (cpu or cuda)")
        if not isinstance(stream.transform, ImageTransform):
            raise TypeError("make_loader: the stream's transform must come from build_transform")
        self.stream, self.batch_size, self.workers = stream, batch_size, workers
        self.dataloader = DataLoader(
            _Unnormalized(stream, batch_size),
            batch_size=batch_size,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            drop_last=False,
            persistent_workers=persistent and workers > 0,
            prefetch_factor=4 if workers else None,
            collate_fn=_Collate(),
            generator=generator,  # the workers' base seed is drawn from it
        )
        self.to_device: Callable[[Iterable[Batch]], Iterator[Batch]] = (
            _DeviceBatches(stream.transform, self.device, memory_format)
            if self.device.type == "cuda"
            else _HostBatches(stream.transform, memory_format)
        )

    def __len__(self) -> int:
        batches = self.stream.plan(self.workers, self.batch_size).batches(self.stream.rank)
        return batches - self.stream.skip_batches

    def __iter__(self) -> Iterator[Batch]:
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"the loader was built for {self.device}, but CUDA is not available in this "
                "process: pass device='cpu', or run where a GPU is visible"
            )
        # The DataLoader's iterator is made now, not at the first batch: with persistent
        # workers that sends them the epoch's first requests, so `iter(loader)` before some
        # other work (validation) has the first batches ready when the epoch starts.
        return self.to_device(iter(self.dataloader))


def make_loader(
    stream: ShardStream,
    batch_size: int,
    workers: int = 0,
    device: torch.device | str = "cpu",
    memory_format: torch.memory_format = torch.contiguous_format,
    persistent: bool = False,
    generator: torch.Generator | None = None,
) -> ShardLoader:
    """Batches of (normalised float32 images, int64 labels, list of ids) on `device`.

    `workers` DataLoader processes (0: read in this process); `persistent` keeps them across
    epochs (the epoch reaches them through the stream's shared memory). On `cuda` the workers'
    uint8 batches are pinned, copied without blocking and normalised on the GPU; on the CPU
    they are normalised here into reused huge-page buffers.
    """
    return ShardLoader(stream, batch_size, workers, device, memory_format, persistent, generator)
