"""Reading a shard set's `index.json`: where the shards live and what each holds.

The reading side of `attnpipe.data.shard` (which writes them): what train, tune and evaluate
need, without the writer's decoding and manifest code, so that editing the writer or `prepare`
re-runs only the data stages (see `attnpipe.codeversion`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from attnpipe import storage
from attnpipe.config import Recipe
from attnpipe.data.tar_reader import ShardFormatError
from attnpipe.errors import AttnpipeError
from attnpipe.paths import PipelinePaths

INDEX_NAME = "index.json"
OFFSETS_SUFFIX = ".idx"  # a shard's sample offsets, beside it: train-00000.idx


class ShardError(AttnpipeError, RuntimeError):
    pass


def shard_location(recipe: Recipe, paths: PipelinePaths) -> str:
    """Where train and evaluate read the shards: `shard.publish_to` when set, else local."""
    return recipe.shard.publish_to or str(paths.shards.resolve())


def read_index_bytes(shards_dir: Path | str) -> bytes:
    """The raw `index.json` of a local folder or a URL prefix (s3://, gs://, ...)."""
    location = storage.join(shards_dir, INDEX_NAME)
    try:
        return storage.read_bytes(location)
    except FileNotFoundError:
        how = "`attnpipe shard` with shard.publish_to set" if storage.is_url(location) else ""
        raise ShardError(f"{location} is missing: run {how or '`attnpipe shard`'} first") from None


def read_index(shards_dir: Path | str) -> dict:
    """Load `index.json` from a local folder or a URL prefix."""
    return json.loads(read_index_bytes(shards_dir))


def shard_urls(shards_dir: Path | str, index: dict, split: str) -> list[str]:
    if split not in index["splits"]:
        raise ShardError(f"no '{split}' shards in {shards_dir}; check prepare.splits")
    location = str(shards_dir).rstrip("/")
    return [f"{location}/{entry['name']}" for entry in index["splits"][split]["shards"]]


@dataclass(frozen=True)
class ShardEntry:
    """One shard of a split, as `index.json` describes it.

    `offsets[i]`: where sample i's first header starts in the tar; `end_offset`: where the
    end-of-archive marker starts. In a compact index they live in a side file
    (`offsets_url`), read by `with_offsets` only when a reader needs this shard; both None
    (and no side file) for indexes written before offsets were recorded.
    """

    url: str
    samples: int
    offsets: tuple[int, ...] | None = None
    end_offset: int | None = None
    offsets_url: str | None = None

    @classmethod
    def from_index(cls, url: str, entry: dict[str, Any]) -> ShardEntry:
        offsets = entry.get("offsets")  # inline: an index written before side files
        if offsets is not None and len(offsets) != entry["samples"]:
            raise ShardFormatError(
                f"{url}: index.json lists {len(offsets)} offsets for {entry['samples']} samples: "
                "re-run `attnpipe shard`"
            )
        side = entry.get("offsets_file")
        return cls(
            url=url,
            samples=entry["samples"],
            offsets=tuple(offsets) if offsets is not None else None,
            end_offset=entry.get("end_offset") if offsets is not None else None,
            offsets_url=f"{url.rpartition('/')[0]}/{side}" if side else None,
        )

    @property
    def has_offsets(self) -> bool:
        return self.offsets is not None or self.offsets_url is not None

    def with_offsets(self) -> ShardEntry:
        """This entry with its offsets loaded (from the side file when they are there)."""
        if self.offsets is not None or self.offsets_url is None:
            return self
        values = read_offsets(self.offsets_url, self.samples)
        return replace(self, offsets=tuple(values[:-1]), end_offset=values[-1])

    def byte_range(self, start: int, stop: int) -> tuple[int, int | None]:
        """Where samples `start` to `stop - 1` begin and end in the tar (end None: unknown)."""
        if self.offsets is None:
            raise ValueError(f"{self.url}: index.json has no sample offsets")
        end = self.offsets[stop] if stop < self.samples else self.end_offset
        return self.offsets[start], end


def read_offsets(location: str, samples: int) -> list[int]:
    """A shard's side file: `samples` start offsets, then the end-of-archive offset."""
    try:
        data = storage.read_bytes(location)
    except FileNotFoundError:
        raise ShardFormatError(
            f"{location} is missing: re-run `attnpipe shard` (and publish again)"
        ) from None
    if len(data) != 8 * (samples + 1):
        raise ShardFormatError(
            f"{location}: {len(data) // 8} offsets for {samples} samples: the shard and its "
            "index do not match; re-run `attnpipe shard` (and publish again)"
        )
    return np.frombuffer(data, dtype="<i8").tolist()


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
    counts = index["splits"][split].get("class_counts")
    if counts is None:  # an index with per-shard counts (written before class_counts)
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
