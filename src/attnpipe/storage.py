"""Files on local disk or on object storage (s3://, gs://, ...), through pyarrow's filesystems.

Every node of a cluster reads shards and writes checkpoints through these helpers, so one URL
in the recipe works on a laptop and on each worker alike. Credentials and endpoints come from
the environment, as pyarrow reads them: for S3 `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION`, and `AWS_ENDPOINT_URL` for S3-compatible stores (MinIO, moto, R2...).
Nothing here prints or logs them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import BinaryIO

READ_BUFFER = 8 * 1024 * 1024


def is_url(location: str | Path) -> bool:
    """True for object-storage URLs; plain paths and file:// are local."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | Path) -> Path:
    return Path(str(location).removeprefix("file://"))


def join(location: str | Path, *parts: str) -> str:
    return "/".join([str(location).rstrip("/"), *parts])


def _resolve(url: str):
    from pyarrow import fs

    return fs.FileSystem.from_uri(url)


def open_input(location: str | Path) -> BinaryIO:
    """A readable binary stream of a local file or an object-storage URL."""
    if not is_url(location):
        return open(local_path(location), "rb")
    filesystem, path = _resolve(str(location))
    # Readers such as tarfile ask for a few KiB at a time; unbuffered, every read would be an
    # HTTP range request. Bytes as stored: no decompression guessed from the file name.
    return filesystem.open_input_stream(path, compression=None, buffer_size=READ_BUFFER)


def open_input_file(location: str | Path) -> BinaryIO:
    """A seekable, unbuffered binary file, local or on object storage, for reading byte ranges:
    on object storage each read is one ranged request, so callers read in large pieces."""
    if not is_url(location):
        return open(local_path(location), "rb", buffering=0)
    filesystem, path = _resolve(str(location))
    return filesystem.open_input_file(path)


def read_bytes(location: str | Path) -> bytes:
    with open_input(location) as stream:
        return stream.read()


def exists(location: str | Path) -> bool:
    if not is_url(location):
        return local_path(location).exists()
    from pyarrow import fs

    filesystem, path = _resolve(str(location))
    return filesystem.get_file_info(path).type != fs.FileType.NotFound


def upload_file(source: Path, destination: str) -> int:
    """Copy one local file to `destination` (a URL or a path); returns the bytes written."""
    if not is_url(destination):
        target = local_path(destination)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(source.read_bytes())
        tmp.replace(target)
        return target.stat().st_size
    filesystem, path = _resolve(destination)
    parent = path.rsplit("/", 1)[0]
    filesystem.create_dir(parent, recursive=True)
    with source.open("rb") as handle, filesystem.open_output_stream(path) as out:
        while chunk := handle.read(8 * 1024 * 1024):
            out.write(chunk)
    return filesystem.get_file_info(path).size


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a small file (a manifest, a pointer) to a URL or a path, replacing it whole."""
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / "blob"
        local.write_bytes(data)
        upload_file(local, str(location))


def list_files(location: str | Path) -> dict[str, int]:
    """{name: size} of the files directly inside a folder or URL prefix (empty if none)."""
    if not is_url(location):
        folder = local_path(location)
        if not folder.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    from pyarrow import fs

    filesystem, path = _resolve(str(location))
    selector = fs.FileSelector(path.rstrip("/"), allow_not_found=True, recursive=False)
    return {
        info.base_name: info.size
        for info in filesystem.get_file_info(selector)
        if info.type == fs.FileType.File
    }


def delete_file(location: str | Path) -> None:
    if not is_url(location):
        local_path(location).unlink(missing_ok=True)
        return
    filesystem, path = _resolve(str(location))
    filesystem.delete_file(path)


def download_file(location: str | Path, target: Path) -> int:
    """Copy one file from a URL or path to a local `target` (atomically); returns its size."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with open_input(location) as stream, tmp.open("wb") as out:
        while chunk := stream.read(8 * 1024 * 1024):
            out.write(chunk)
    tmp.replace(target)
    return target.stat().st_size


def list_tree(location: str | Path) -> dict[str, int]:
    """{relative path: size} of every file below a folder or URL prefix (empty if none)."""
    if not is_url(location):
        folder = local_path(location)
        if not folder.is_dir():
            return {}
        return {
            p.relative_to(folder).as_posix(): p.stat().st_size
            for p in folder.rglob("*")
            if p.is_file()
        }
    from pyarrow import fs

    filesystem, path = _resolve(str(location))
    base = path.rstrip("/")
    selector = fs.FileSelector(base, allow_not_found=True, recursive=True)
    return {
        info.path[len(base) + 1 :]: info.size
        for info in filesystem.get_file_info(selector)
        if info.type == fs.FileType.File
    }
