"""Writing the shards' tar files with the standard library.

The bytes are those WebDataset's `TarWriter(stream, mtime=0)` writes (a test compares the two on
the same samples), so any WebDataset reader reads the shards. Not webdataset itself: importing
it imports torch, 5 s of CPU in every process that writes shards (each shard worker) on a
2-core machine, for a writer of twenty lines.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping
from types import TracebackType
from typing import BinaryIO

MEMBER_MODE = 0o444  # WebDataset's: read-only members
MEMBER_OWNER = "bigdata"  # WebDataset's user and group names


class ShardTarWriter:
    """Samples into an uncompressed tar stream: a sample is a key and its members by extension,
    written in sorted extension order with `mtime=0`, so the same samples give the same bytes."""

    def __init__(self, stream: BinaryIO):
        # Closed by close(), which the writer's own context manager calls.
        self._tar = tarfile.open(fileobj=stream, mode="w|")  # noqa: SIM115

    @property
    def offset(self) -> int:
        """Where the next member's first header (PAX headers included) starts."""
        return self._tar.offset

    def write(self, key: str, members: Mapping[str, bytes]) -> None:
        for extension in sorted(members):
            data = members[extension]
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(data)
            info.mtime = 0
            info.mode = MEMBER_MODE
            info.uname = info.gname = MEMBER_OWNER
            self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> ShardTarWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()
