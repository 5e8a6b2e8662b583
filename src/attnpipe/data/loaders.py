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
"""

from __future__ import annotations

import bisect
import copy
import io
import itertools
import json
import math
import mmap
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2

from attnpipe import storage
from attnpipe.config import AugmentConfig
from attnpipe.data.shard_index import read_index, shard_urls
from attnpipe.errors import AttnpipeError

IMAGE_KEYS = ("jpg", "png")
_BLOCK = 512
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # key, extensions (as webdataset)


class ShardFormatError(AttnpipeError, ValueError):
    """A shard is not a readable tar file, or does not match its index."""


class _Window(io.RawIOBase):
    """Bytes `start` to `end` of a seekable file: reads end at `end`, so a buffer on top never
    fetches more than the range (on object storage, never past a reader's share)."""

    def __init__(self, raw: BinaryIO, start: int, end: int | None):
        super().__init__()
        if start:
            raw.seek(start)
        self.raw = raw
        self.left = sys.maxsize if end is None else max(0, end - start)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")[: self.left]
        if not len(view):
            return 0
        count = self.raw.readinto(view) or 0
        self.left -= count
        return count

    def close(self) -> None:
        self.raw.close()
        super().close()


def open_shard(url: str, start: int = 0, end: int | None = None) -> BinaryIO:
    """A buffered stream of a shard from byte `start`; readers stop at `end` themselves.

    A local path, or any URL pyarrow's filesystems know (s3://, gs://, hdfs://...). On object
    storage the stream also ends at `end`, so its buffer never fetches bytes past a reader's
    share; a local file is read as `open()` reads it (the page cache makes read-ahead free).
    """
    if not storage.is_url(url):
        stream = open(storage.local_path(url), "rb")  # noqa: SIM115 (the caller closes it)
        stream.seek(start)
        return stream
    buffer = storage.READ_BUFFER if end is None else max(1, min(storage.READ_BUFFER, end - start))
    return io.BufferedReader(_Window(storage.open_input_file(url), start, end), buffer)


def _read_exact(stream: BinaryIO, size: int, url: str) -> bytes:
    data = stream.read(size)
    while len(data) < size:  # network streams may return short reads
        more = stream.read(size - len(data))
        if not more:
            raise ShardFormatError(f"{url}: truncated tar (wanted {size} bytes, got {len(data)})")
        data += more
    return data


def _octal(field: bytes, url: str) -> int:
    if field[:1] == b"\x80":  # GNU base-256, for sizes past 8 GB
        return int.from_bytes(field[1:], "big")
    field = field.rstrip(b"\0 ").strip()
    try:
        return int(field, 8) if field else 0
    except ValueError:
        raise ShardFormatError(f"{url}: bad tar header (not a tar, or corrupt)") from None


def _check_header(header: bytes, url: str) -> None:
    stored = _octal(header[148:156], url)
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if stored != unsigned and stored != unsigned - 256 * sum(
        b > 127 for b in header[:148] + header[156:]
    ):  # some writers sum signed bytes
        raise ShardFormatError(f"{url}: bad tar header checksum (not a tar, or corrupt)")


def _pax_path(body: bytes) -> str | None:
    """The `path` record of a PAX extended header: records "<length> <key>=<value>\\n"."""
    position, path = 0, None
    while position < len(body):
        space = body.index(b" ", position)
        end = position + int(body[position:space])
        key, _, value = body[space + 1 : end - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        position = end
    return path


def iter_tar_members(
    stream: BinaryIO, url: str, length: int | None = None
) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of a tar stream, in order.

    A small reader for the shards `shard` writes (ustar, with PAX or GNU long names when a
    name needs them): ten times faster than `tarfile`, which parses every header field in
    Python. Checksums are verified; other member types (folders, links) are skipped. With
    `length`, the stream starts at a member's first header and the reader stops after `length`
    bytes (which must end on a member boundary) without looking further.
    """
    long_name: str | None = None
    position = 0
    while length is None or position < length:
        header = stream.read(_BLOCK)
        if header == b"\0" * _BLOCK:
            if length is not None:
                raise ShardFormatError(f"{url}: the archive ends before the range index.json gives")
            return  # the end-of-archive marker
        if len(header) < _BLOCK:  # a shard cut short (a partial copy or upload)
            raise ShardFormatError(f"{url}: truncated tar (no end-of-archive marker)")
        _check_header(header, url)
        size = _octal(header[124:136], url)
        kind = header[156:157]
        body = _read_exact(stream, size, url) if size else b""
        padding = -size % _BLOCK
        if padding:
            _read_exact(stream, padding, url)
        position += _BLOCK + size + padding
        if kind == b"x":  # PAX extended header
            long_name = _pax_path(body) or long_name
            continue
        if kind == b"L":  # GNU long name
            long_name = body.rstrip(b"\0").decode("utf-8")
            continue
        if kind not in (b"0", b"\0"):
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[:100].rstrip(b"\0").decode("utf-8")
            prefix = header[345:500].rstrip(b"\0").decode("utf-8")
            if prefix and header[257:262] == b"ustar":
                name = f"{prefix}/{name}"
        yield name, body
    if position != length:
        raise ShardFormatError(f"{url}: a member crosses the end of the range index.json gives")


def _group_samples(members: Iterable[tuple[str, bytes]], url: str) -> Iterator[dict[str, Any]]:
    """Consecutive members sharing a key, as webdataset groups them."""
    sample: dict[str, Any] | None = None
    for name, data in members:
        match = _MEMBER_NAME.match(name)
        if match is None:
            continue
        key, extension = match.group(1), match.group(2).lower()
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        sample[extension] = data
    if sample is not None:
        yield sample


def iter_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one whole shard, in tar order."""
    with closing(open_shard(url)) as stream:
        yield from _group_samples(iter_tar_members(stream, url), url)


@dataclass(frozen=True)
class ShardEntry:
    """One shard of a split, as `index.json` describes it.

    `offsets[i]`: where sample i's first header starts in the tar; `end_offset`: where the
    end-of-archive marker starts. Both None for indexes written before they were recorded.
    """

    url: str
    samples: int
    offsets: tuple[int, ...] | None = None
    end_offset: int | None = None

    @classmethod
    def from_index(cls, url: str, entry: dict[str, Any]) -> ShardEntry:
        offsets = entry.get("offsets")
        if offsets is not None and len(offsets) != entry["samples"]:
            raise ShardFormatError(
                f"{url}: index.json lists {len(offsets)} offsets for {entry['samples']} samples: "
                "re-run `attnpipe shard`"
            )
        return cls(
            url=url,
            samples=entry["samples"],
            offsets=tuple(offsets) if offsets is not None else None,
            end_offset=entry.get("end_offset") if offsets is not None else None,
        )

    def byte_range(self, start: int, stop: int) -> tuple[int, int | None]:
        """Where samples `start` to `stop - 1` begin and end in the tar (end None: unknown)."""
        if self.offsets is None:
            raise ValueError(f"{self.url}: index.json has no sample offsets")
        end = self.offsets[stop] if stop < self.samples else self.end_offset
        return self.offsets[start], end


def read_samples(shard: ShardEntry, start: int, stop: int) -> Iterator[dict[str, Any]]:
    """Samples `start` to `stop - 1` of a shard, reading only their bytes.

    Without offsets (an older index) the shard is read from its start and the samples before
    `start` are skipped.
    """
    if start >= stop:
        return
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


class ImageTransform:
    """uint8 CHW image -> normalised float CHW tensor, in two halves.

    `augment` (crop, flips, ... on uint8) runs per sample in the loader's workers;
    `normalize` (to float, minus mean, over std) runs on whole batches in the main process,
    which is what `make_loader` does: samples cross between processes as uint8 (a quarter of
    the bytes, and shared-memory pages are costly to create). Calling the object does both,
    so it is a drop-in `transform`.
    """

    def __init__(self, augment: Callable, mean: Sequence[float], std: Sequence[float]):
        self.augment = augment
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_t

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.augment(image))

    def normalize(self, images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x / 255 -> (x - mean) / std for one image (C, H, W) or a batch (N, C, H, W).

        A batch is done image by image so that each one's three passes stay in cache.
        """
        if out is None:
            out = torch.empty(images.shape, dtype=torch.float32)
        if images.dim() == 3:
            return out.copy_(images).mul_(self.scale).add_(self.shift)
        for source, target in zip(images, out, strict=True):
            target.copy_(source).mul_(self.scale).add_(self.shift)
        return out


class _RandomResizedCrop:
    """torchvision's RandomResizedCrop: the same box from the same random numbers (drawn by
    the v2 transform itself) and the same antialiased bilinear resize, bit for bit. It skips
    v2's per-call dispatch and resizes the crop in place of memory layout: decoded JPEGs are
    channels-last, the layout of torch's fast uint8 kernel, so nothing is copied first."""

    def __init__(self, size: int, scale, ratio):
        self.size = (size, size)
        self.sampler = v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        box = self.sampler.make_params([image])
        top, left = box["top"], box["left"]
        crop = image[..., top : top + box["height"], left : left + box["width"]]
        return torch.nn.functional.interpolate(
            crop.unsqueeze(0), size=self.size, mode="bilinear", antialias=True, align_corners=False
        )[0]


class _RandomFlip:
    def __init__(self, p: float, dim: int):
        self.p, self.dim = p, dim

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.flip(self.dim) if torch.rand(1).item() < self.p else image


def build_transform(augment: AugmentConfig, input_size: int, train: bool) -> ImageTransform:
    """uint8 CHW tensor -> normalised float CHW tensor of `input_size`.

    Training: the random crop, then flips, rotation, RandAugment or TrivialAugmentWide and
    colour jitter, each only when the recipe turns it on (so the default pipeline, and the
    random numbers it draws, are what they were before those switches existed). Random
    erasing, MixUp and CutMix work on whole batches: `attnpipe.data.batch_augment`.
    """
    if not train:
        steps: list[Callable] = [
            v2.Resize(input_size, antialias=True),
            v2.CenterCrop(input_size),
        ]
        return ImageTransform(v2.Compose(steps), augment.mean, augment.std)
    steps = [
        _RandomResizedCrop(
            input_size, augment.random_resized_crop_scale, augment.random_resized_crop_ratio
        )
    ]
    if augment.horizontal_flip:
        steps.append(_RandomFlip(augment.horizontal_flip, dim=-1))
    if augment.vertical_flip:
        steps.append(_RandomFlip(augment.vertical_flip, dim=-2))
    if augment.rotation_degrees:
        steps.append(v2.RandomRotation(augment.rotation_degrees))
    if augment.auto_augment == "randaugment":
        steps.append(v2.RandAugment(augment.randaugment_num_ops, augment.randaugment_magnitude))
    elif augment.auto_augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide())
    if augment.color_jitter:
        strength = augment.color_jitter
        steps.append(v2.ColorJitter(strength, strength, strength))
    return ImageTransform(v2.Compose(steps), augment.mean, augment.std)


def decode_sample(sample: dict[str, Any]) -> tuple[torch.Tensor, int, dict]:
    key = next(k for k in IMAGE_KEYS if k in sample)
    data = torch.frombuffer(bytearray(sample[key]), dtype=torch.uint8)
    if key == "jpg":
        image = decode_jpeg(data, mode=ImageReadMode.RGB)
    else:
        image = decode_image(data, mode=ImageReadMode.RGB)
    meta = json.loads(sample["json"])
    return image, int(sample["cls"]), meta


@dataclass(frozen=True)
class SplitInfo:
    urls: list[str]
    samples: int
    classes: list[str]
    class_counts: list[int]
    shards: list[ShardEntry]


def split_info(shards_dir: Path | str, split: str) -> SplitInfo:
    index = read_index(shards_dir)
    urls = shard_urls(shards_dir, index, split)
    entries = index["splits"][split]["shards"]
    counts = dict.fromkeys(index["classes"], 0)
    for entry in entries:
        for name, count in entry["classes"].items():
            counts[name] += count
    return SplitInfo(
        urls=urls,
        samples=index["splits"][split]["samples"],
        classes=index["classes"],
        class_counts=[counts[name] for name in index["classes"]],
        shards=[ShardEntry.from_index(u, e) for u, e in zip(urls, entries, strict=True)],
    )


def shard_entries(urls: Sequence[str]) -> list[ShardEntry]:
    """The index entries of shards given by URL (each folder's `index.json` is read once)."""
    indexes: dict[str, dict[str, tuple[str, dict]]] = {}
    found = []
    for url in urls:
        folder, _, name = str(url).rpartition("/")
        if folder not in indexes:
            index = read_index(folder)
            indexes[folder] = {
                e["name"]: e for block in index["splits"].values() for e in block["shards"]
            }
        if name not in indexes[folder]:
            raise ShardFormatError(f"{url}: not in {folder}/index.json; re-run `attnpipe shard`")
        found.append(ShardEntry.from_index(str(url), indexes[folder][name]))
    return found


# --------------------------------------------------------------------------- reader plan
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


class ShardStream(IterableDataset):
    """The samples of one split for one rank, read by this process's DataLoader workers.

    Yields (image, label, sample id): each reader (rank, worker) its range of the epoch's
    `plan`, training ranges buffer-shuffled (seeded by seed, epoch and reader). `shards` come
    from `split_info(...).shards`; `urls=` (shard URLs) is accepted too and looks the shards up
    in the `index.json` beside them.

    The epoch lives in shared memory: DataLoader workers hold a copy of the stream made when
    they started, and persistent workers must still see `set_epoch` of later epochs.
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
        if train:
            train_batches(self.samples_total, world_size, 1)  # fails early on too few samples
        if any(s.offsets is None for s in self.shards):
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

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

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
        and `workers` are given. Training shares are whole batches of `batch_size`.
        `normalize=False` leaves images uint8 (augmented only), for `make_loader`."""
        info = get_worker_info()
        if worker is None or workers is None:
            workers, worker = (info.num_workers, info.id) if info else (1, 0)
        # Samples are already in uint8; extra intra-op threads per loader worker only contend.
        if info is not None:
            torch.set_num_threads(1)
        epoch = self.epoch
        segments = self.plan(workers, batch_size, epoch).segments(self.rank, worker)
        samples = self.read(segments)
        if self.train:
            reader = self.rank * workers + worker
            rng = np.random.default_rng([self.seed, epoch, reader])
            samples = buffer_shuffle(samples, self.shuffle_buffer, rng)
        transform = self.transform if normalize else self.transform.augment
        for sample in samples:
            image, label, meta = decode_sample(sample)
            yield transform(image), label, meta["id"]

    def read(self, segments: Iterable[Segment]) -> Iterator[dict[str, Any]]:
        """The raw samples of `segments`, in order."""
        for segment in segments:
            yield from read_samples(self.shards[segment.shard], segment.start, segment.stop)


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


class FloatBatchPool:
    """Batch tensors (float32 unless asked) that are cheap to fill: huge pages, reused once
    released.

    A fresh 40 MB batch costs ten thousand page faults, which on a virtual machine cost more
    than normalising the images. Each batch here lives in an anonymous mapping advised to use
    2 MB (transparent huge) pages, and a mapping is handed out again only when no tensor,
    view or storage refers to it any more (the mapping's reference count says so: tensors
    made by `torch.frombuffer` hold it until their storage dies), so a batch the caller still
    holds is never overwritten.
    """

    SMALL = 4 << 20  # below this, torch's allocator (malloc) reuses memory well enough

    def __init__(self, keep: int = 4):
        self.keep = keep
        self.regions: list[mmap.mmap] = []

    def get(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = tuple(shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self.SMALL or not hasattr(mmap, "MADV_HUGEPAGE"):
            return torch.empty(shape, dtype=dtype)
        region = self._free_region(nbytes)
        if region is None:
            region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            region.madvise(mmap.MADV_HUGEPAGE)
            self._remember(region)
        return torch.frombuffer(region, dtype=dtype).view(shape)

    def __getstate__(self) -> dict:
        return {"keep": self.keep, "regions": []}  # mappings are this process's own

    def _free_region(self, nbytes: int) -> mmap.mmap | None:
        for region in self.regions:
            # Referenced by the list, `region` and getrefcount's argument: nothing else.
            if len(region) == nbytes and sys.getrefcount(region) <= 3:
                return region
        return None

    def _remember(self, region: mmap.mmap) -> None:
        if len(self.regions) < self.keep:
            self.regions.append(region)
            return
        for i, old in enumerate(self.regions):  # replace a released one of another size
            if sys.getrefcount(old) <= 3:
                self.regions[i] = region
                return


Batch = tuple[torch.Tensor, torch.Tensor, list[str]]


class _Collate:
    """(image, label, id) samples -> (uint8 images, int64 labels, ids), as `default_collate`.

    Read in this process (workers=0), the images are stacked into reused huge-page memory: a
    fresh 10 MB uint8 batch per step costs its page faults again, about 2% of the loader's
    time. DataLoader workers collate as torch does (straight into shared memory).
    """

    def __init__(self) -> None:
        self.pool = FloatBatchPool()

    def __call__(self, samples: list[tuple]) -> Batch:
        if get_worker_info() is not None:
            return default_collate(samples)
        images, labels, ids = zip(*samples, strict=True)
        shape = (len(images), *images[0].shape)
        out = torch.stack(images, out=self.pool.get(shape, images[0].dtype))
        return out, torch.tensor(labels, dtype=torch.int64), list(ids)


def normalize_on_device(
    images: torch.Tensor,
    transform: ImageTransform,
    device: torch.device | str,
    memory_format: torch.memory_format = torch.contiguous_format,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 batch (N, C, H, W) -> normalised float32 on `device`, in `memory_format`.

    The GPU input path's arithmetic (x / 255 -> (x - mean) / std as one multiply and one add,
    as `ImageTransform.normalize` does on the CPU: the same float32 values). `images` may be on
    the host (pinned: the copy does not block) or already on `device`; `out` is written when
    given (allocated by the caller on the stream that will use it).
    """
    device = torch.device(device)
    if out is None:
        out = torch.empty(
            images.shape, dtype=torch.float32, device=device, memory_format=memory_format
        )
    staged = images.to(device, non_blocking=True)
    scale = transform.scale.to(device, non_blocking=True)
    shift = transform.shift.to(device, non_blocking=True)
    return out.copy_(staged).mul_(scale).add_(shift)


class _HostBatches:
    """The CPU path: uint8 batches normalised in this process into reused huge-page buffers
    (one pool for every epoch: fresh buffers would cost their page faults again)."""

    def __init__(self, transform: ImageTransform, memory_format: torch.memory_format):
        self.transform, self.memory_format = transform, memory_format
        self.pool = FloatBatchPool()

    def __call__(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        for images, labels, ids in batches:
            out = self.transform.normalize(images, out=self.pool.get(images.shape))
            if self.memory_format != torch.contiguous_format:
                out = out.contiguous(memory_format=self.memory_format)
            yield out, labels, ids


class _DeviceBatches:
    """The accelerator path: pinned uint8 batches copied without blocking and normalised on the
    device, on a side stream one batch ahead, so that batch k+1's copy overlaps batch k's use.

    Written against the device module's stream API (`torch.cuda`, or `torch.cpu`, whose streams
    are no-ops, which is how it runs in tests). Outputs are allocated on the consumer's stream
    before the side stream waits for it, and the staging tensors live until the consumer has
    waited for the side stream's event, so the caching allocator never hands their memory to
    the consumer while a copy into it may still be running.
    """

    def __init__(
        self, transform: ImageTransform, device: torch.device, memory_format: torch.memory_format
    ):
        self.transform, self.device, self.memory_format = transform, device, memory_format

    def __call__(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        streams = torch.get_device_module(self.device)
        main = streams.current_stream(self.device)
        side = streams.Stream(self.device) if self.device.type == "cuda" else streams.Stream()
        on_device = copy.copy(self.transform)  # mean and std moved once, not per batch
        on_device.scale = self.transform.scale.to(self.device)
        on_device.shift = self.transform.shift.to(self.device)
        pending = None
        for batch in batches:
            started = self._start(batch, on_device, streams, main, side)
            if pending is not None:
                yield self._finish(pending, main)
            pending = started
        if pending is not None:
            yield self._finish(pending, main)

    def _start(
        self, batch: Batch, transform: ImageTransform, streams: Any, main: Any, side: Any
    ) -> tuple:
        images, labels, ids = batch
        out = torch.empty(
            images.shape, dtype=torch.float32, device=self.device, memory_format=self.memory_format
        )
        staged = torch.empty(images.shape, dtype=torch.uint8, device=self.device)
        labels_out = torch.empty(labels.shape, dtype=torch.int64, device=self.device)
        side.wait_stream(main)  # the memory just allocated may still be in use there
        with streams.stream(side):
            staged.copy_(images, non_blocking=True)
            labels_out.copy_(labels, non_blocking=True)
            normalize_on_device(staged, transform, self.device, self.memory_format, out)
        done = side.record_event()
        return out, labels_out, ids, done, (staged, images, labels)

    @staticmethod
    def _finish(pending: tuple, main: Any) -> Batch:
        out, labels, ids, done, _ = pending
        main.wait_event(done)
        return out, labels, ids


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
    every rank). `dataloader` is the underlying torch DataLoader (its workers send uint8).
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
        return self.stream.plan(self.workers, self.batch_size).batches(self.stream.rank)

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
