"""Reading the shards' tar files: a small, checked tar reader and ranged opens.

A local path, or any URL pyarrow's filesystems know (s3://, gs://, ...), opened at a byte
offset; on object storage a stream never fetches past the end it is given.
"""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import closing
from typing import Any, BinaryIO

from attnpipe import storage
from attnpipe.errors import AttnpipeError

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
