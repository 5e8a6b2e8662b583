"""Reading a shard set's `index.json`: where the shards live and what each holds.

The reading side of `attnpipe.data.shard` (which writes them): what train, tune and evaluate
need, without the writer's decoding and manifest code, so that editing the writer or `prepare`
re-runs only the data stages (see `attnpipe.codeversion`).
"""

from __future__ import annotations

import json
from pathlib import Path

from attnpipe import storage
from attnpipe.config import Recipe
from attnpipe.errors import AttnpipeError
from attnpipe.paths import PipelinePaths

INDEX_NAME = "index.json"


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
