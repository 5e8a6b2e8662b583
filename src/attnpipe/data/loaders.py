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
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from webdataset.tariterators import group_by_keys, tar_file_expander

from attnpipe import storage
from attnpipe.config import AugmentConfig
from attnpipe.data.shard import read_index, shard_urls

IMAGE_KEYS = ("jpg", "png")


def open_shard(url: str) -> BinaryIO:
    """A local path, or any URL pyarrow's filesystems know (s3://, gs://, hdfs://...)."""
    return storage.open_input(url)


def iter_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    with closing(open_shard(url)) as stream:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))


def build_transform(augment: AugmentConfig, input_size: int, train: bool) -> Callable:
    """uint8 CHW tensor -> normalised float CHW tensor of `input_size`."""
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(augment.mean, augment.std)]
    if not train:
        return v2.Compose(
            [v2.Resize(input_size, antialias=True), v2.CenterCrop(input_size), *normalize]
        )
    steps: list[Callable] = [
        v2.RandomResizedCrop(
            input_size,
            scale=augment.random_resized_crop_scale,
            ratio=augment.random_resized_crop_ratio,
            antialias=True,
        )
    ]
    if augment.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip(augment.horizontal_flip))
    if augment.vertical_flip:
        steps.append(v2.RandomVerticalFlip(augment.vertical_flip))
    if augment.rotation_degrees:
        steps.append(v2.RandomRotation(augment.rotation_degrees))
    if augment.color_jitter:
        strength = augment.color_jitter
        steps.append(v2.ColorJitter(strength, strength, strength))
    return v2.Compose(steps + normalize)


def decode_sample(sample: dict[str, Any]) -> tuple[torch.Tensor, int, dict]:
    key = next(k for k in IMAGE_KEYS if k in sample)
    data = torch.frombuffer(bytearray(sample[key]), dtype=torch.uint8)
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
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slots, slot = self.world_size * workers, self.rank * workers + worker
        # Samples are already in uint8; extra intra-op threads per loader worker only contend.
        if info is not None:
            torch.set_num_threads(1)
        if not self.train:
            yield from self._evaluate_stream(slot, slots)
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
                yield self.transform(image), label, meta["id"]

    def _evaluate_stream(self, slot: int, slots: int) -> Iterator[tuple]:
        for sample in self._slot_samples(self.urls, slot, slots):
            image, label, meta = decode_sample(sample)
            yield self.transform(image), label, meta["id"]

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


def make_loader(
    stream: ShardStream, batch_size: int, workers: int, pin_memory: bool = False
) -> DataLoader:
    return DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=False,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def steps_per_epoch(samples: int, world_size: int, batch_size: int) -> int:
    """Batches every rank takes per epoch: one pass over the data in total (at least 1)."""
    return max(1, samples // (world_size * batch_size))
