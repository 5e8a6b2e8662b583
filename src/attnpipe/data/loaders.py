"""Streaming loaders over WebDataset shards for training and evaluation.

Work is divided into *slots*: one per (rank, DataLoader worker). With at least as many shards
as slots each slot reads whole shards; with fewer, every slot reads all shards and keeps every
`slots`-th sample. Either way the slots see disjoint samples, and together all of them, which is
what exact evaluation across ranks needs.

Training streams are endless (each pass over a slot's shards reshuffled); the training loop
takes the same number of batches on every rank, so DDP never waits on a rank that ran dry.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
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
    """A shard is not a readable tar file."""


def open_shard(url: str) -> BinaryIO:
    """A local path, or any URL pyarrow's filesystems know (s3://, gs://, hdfs://...)."""
    return storage.open_input(url)


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


def iter_tar_members(stream: BinaryIO, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of a tar stream, in order.

    A small reader for the shards `shard` writes (ustar, with PAX or GNU long names when a
    name needs them): ten times faster than `tarfile`, which parses every header field in
    Python. Checksums are verified; other member types (folders, links) are skipped.
    """
    long_name: str | None = None
    while True:
        header = stream.read(_BLOCK)
        if header == b"\0" * _BLOCK:
            return  # the end-of-archive marker
        if len(header) < _BLOCK:  # a shard cut short (a partial copy or upload)
            raise ShardFormatError(f"{url}: truncated tar (no end-of-archive marker)")
        stored = _octal(header[148:156], url)
        unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if stored != unsigned and stored != unsigned - 256 * sum(
            b > 127 for b in header[:148] + header[156:]
        ):  # some writers sum signed bytes
            raise ShardFormatError(f"{url}: bad tar header checksum (not a tar, or corrupt)")
        size = _octal(header[124:136], url)
        kind = header[156:157]
        body = _read_exact(stream, size, url) if size else b""
        padding = -size % _BLOCK
        if padding:
            _read_exact(stream, padding, url)
        if kind == b"x":  # PAX extended header: records "<length> <key>=<value>\n"
            position = 0
            while position < len(body):
                space = body.index(b" ", position)
                end = position + int(body[position:space])
                key, _, value = body[space + 1 : end - 1].partition(b"=")
                if key == b"path":
                    long_name = value.decode("utf-8")
                position = end
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


def iter_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard: consecutive members sharing a key, as webdataset groups them."""
    with closing(open_shard(url)) as stream:
        sample: dict[str, Any] | None = None
        for name, data in iter_tar_members(stream, url):
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


@dataclass
class ShardStream(IterableDataset):
    """Samples of `urls` for one rank, split further over this process's DataLoader workers.

    Yields (image, label, sample id).
    `train=True`: endless; shards dealt to slots by (seed, epoch), buffer shuffle per pass.
    `train=False`: one pass in a fixed order.
    """

    urls: list[str]
    rank: int
    world_size: int
    transform: Callable
    train: bool
    seed: int = 0
    shuffle_buffer: int = 1000
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple]:
        return self.samples(normalize=True)

    def samples(self, normalize: bool = True) -> Iterator[tuple]:
        """(image, label, id) of this process's slot; `normalize=False` leaves the image uint8
        (augmented only) for `make_loader`'s batch-wise normalisation."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slots, slot = self.world_size * workers, self.rank * workers + worker
        # Samples are already in uint8; extra intra-op threads per loader worker only contend.
        if info is not None:
            torch.set_num_threads(1)
        transform = self.transform
        if not normalize:
            transform = transform.augment
        if not self.train:
            for sample in self._slot_samples(self.urls, slot, slots):
                image, label, meta = decode_sample(sample)
                yield transform(image), label, meta["id"]
            return
        # Every slot draws the same permutation, so slots own disjoint shards; it is fixed for
        # the epoch so that a slot wrapping around never strays into another slot's shards.
        rng = np.random.default_rng([self.seed, self.epoch])
        order = [self.urls[i] for i in rng.permutation(len(self.urls))]
        for pass_index in range(1_000_000):
            samples = self._slot_samples(order, slot, slots)
            local_rng = np.random.default_rng([self.seed, self.epoch, pass_index, slot])
            for sample in buffer_shuffle(samples, self.shuffle_buffer, local_rng):
                image, label, meta = decode_sample(sample)
                yield transform(image), label, meta["id"]

    @staticmethod
    def _slot_samples(urls: list[str], slot: int, slots: int) -> Iterator[dict]:
        if len(urls) >= slots:
            for url in urls[slot::slots]:
                yield from iter_tar_samples(url)
            return
        position = 0
        for url in urls:
            for sample in iter_tar_samples(url):
                if position % slots == slot:
                    yield sample
                position += 1


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


@dataclass(frozen=True)
class SplitInfo:
    urls: list[str]
    samples: int
    classes: list[str]
    class_counts: list[int]


def split_info(shards_dir: Path | str, split: str) -> SplitInfo:
    index = read_index(shards_dir)
    urls = shard_urls(shards_dir, index, split)
    counts = dict.fromkeys(index["classes"], 0)
    for entry in index["splits"][split]["shards"]:
        for name, count in entry["classes"].items():
            counts[name] += count
    return SplitInfo(
        urls=urls,
        samples=index["splits"][split]["samples"],
        classes=index["classes"],
        class_counts=[counts[name] for name in index["classes"]],
    )


class _Unnormalized(IterableDataset):
    """A view of a `ShardStream` that yields augmented uint8 images (same stream object, so
    its epoch and settings are whatever they are when an iterator starts)."""

    def __init__(self, stream: ShardStream):
        self.stream = stream

    def __iter__(self) -> Iterator[tuple]:
        return self.stream.samples(normalize=False)


class FloatBatchPool:
    """Float32 batch tensors that are cheap to fill: huge pages, reused once released.

    A fresh 40 MB batch costs ten thousand page faults, which on a virtual machine cost more
    than normalising the images. Each batch here lives in an anonymous mapping advised to use
    2 MB (transparent huge) pages, and a mapping is handed out again only when no tensor,
    view or storage refers to it any more (the mapping's reference count says so: tensors
    made by `torch.frombuffer` hold it until their storage dies), so a batch the caller still
    holds is never overwritten. Pinned memory comes from CUDA's caching host allocator.
    """

    SMALL = 4 << 20  # below this, torch's allocator (malloc) reuses memory well enough

    def __init__(self, keep: int = 4):
        self.keep = keep
        self.regions: list[mmap.mmap] = []

    def get(self, shape: Sequence[int], pin_memory: bool = False) -> torch.Tensor:
        shape = tuple(shape)
        nbytes = math.prod(shape) * 4
        if pin_memory:
            return torch.empty(shape, dtype=torch.float32, pin_memory=True)
        if nbytes < self.SMALL or not hasattr(mmap, "MADV_HUGEPAGE"):
            return torch.empty(shape, dtype=torch.float32)
        region = self._free_region(nbytes)
        if region is None:
            region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            region.madvise(mmap.MADV_HUGEPAGE)
            self._remember(region)
        return torch.frombuffer(region, dtype=torch.float32).view(shape)

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


class _NormalizingLoader(DataLoader):
    """A DataLoader whose workers send uint8 batches and whose batches come out normalised."""

    def __init__(self, stream: ShardStream, **kwargs):
        super().__init__(_Unnormalized(stream), **kwargs)
        self.image_transform: ImageTransform = stream.transform

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        pool = FloatBatchPool()
        for images, labels, ids in super().__iter__():
            out = pool.get(images.shape, pin_memory=self.pin_memory and images.is_pinned())
            yield self.image_transform.normalize(images, out=out), labels, ids


def make_loader(
    stream: ShardStream, batch_size: int, workers: int, pin_memory: bool = False
) -> DataLoader:
    """Batches of (normalised float images, int64 labels, list of ids) from `stream`."""
    options = dict(
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=False,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    if isinstance(stream.transform, ImageTransform):
        return _NormalizingLoader(stream, **options)
    return DataLoader(stream, **options)


def steps_per_epoch(samples: int, world_size: int, batch_size: int) -> int:
    """Batches every rank takes per epoch: one pass over the data in total (at least 1)."""
    return max(1, samples // (world_size * batch_size))
