"""Safe extraction of downloaded archives: nothing may land outside the target folder.

A hostile or broken zip can name members `/etc/passwd`, `../../x`, `C:\\x`, or carry a symlink
that points outside and a later member written through it. Every member is checked before
anything is written; one bad member rejects the whole archive. Symlinks that stay inside are
recreated as symlinks; file permissions in the archive are ignored (no setuid, no exec bits).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import stat
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from attnpipe.data.sources import FetchError


class UnsafeArchiveError(FetchError):
    """An archive member would be written outside the target folder."""


def _member_parts(name: str) -> tuple[str, ...]:
    """The path components of a member name, or raise if it could escape the target."""
    if "\x00" in name:
        raise UnsafeArchiveError(f"member {name!r} has a NUL byte in its name")
    # Zips made on Windows may use backslashes; treat them as separators for the checks.
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise UnsafeArchiveError(f"member {name!r} has an absolute path")
    parts = tuple(p for p in PurePosixPath(unified).parts if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(f"member {name!r} climbs out of the target folder with '..'")
    return parts


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def _wanted(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(fnmatch.fnmatch(name, pattern) for pattern in include):
        return False
    return not any(fnmatch.fnmatch(name, pattern) for pattern in exclude)


def safe_extract_zip(
    archive: Path, target: Path, exclude: Sequence[str] = (), include: Sequence[str] = ()
) -> tuple[list[str], int]:
    """Extract `archive` under `target`; return the member names written and the skipped count.

    With `include`, only members matching one of its globs are written (ImageNet's archive holds
    its unlabelled test images and XML boxes too: 17 GB a classifier never reads). Members
    matching a glob in `exclude` are skipped. Raises `UnsafeArchiveError` (before writing
    anything) for absolute paths, `..`, and symlinks whose target leaves `target`.
    """
    target.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(target)
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as error:
        raise FetchError(
            f"{archive} is not a valid zip file ({error}); delete it and retry"
        ) from None
    with zf:
        plan: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
        skipped = 0
        for info in zf.infolist():
            parts = _member_parts(info.filename)
            if not parts:
                continue
            if not _wanted("/".join(parts), include, exclude):
                skipped += 1
                continue
            if _is_symlink(info):
                link = zf.read(info).decode("utf-8", "surrogateescape")
                resolved = os.path.normpath(os.path.join(root, *parts[:-1], link))
                if os.path.isabs(link) or not _inside(resolved, root):
                    raise UnsafeArchiveError(
                        f"member {info.filename!r} is a symlink to {link!r}, outside the target"
                    )
            plan.append((info, parts))

        written: list[str] = []
        for info, parts in plan:
            destination = os.path.join(root, *parts)
            # A symlink extracted earlier could redirect a later member: check the real path.
            parent = os.path.realpath(os.path.dirname(destination))
            if not _inside(parent, root):
                raise UnsafeArchiveError(
                    f"member {info.filename!r} would be written outside the target via a symlink"
                )
            if info.is_dir():
                os.makedirs(destination, exist_ok=True)
                continue
            os.makedirs(parent, exist_ok=True)
            if os.path.lexists(destination) and (
                os.path.islink(destination) or not os.path.isfile(destination)
            ):
                raise UnsafeArchiveError(f"member {info.filename!r} would replace a link or folder")
            if _is_symlink(info):
                os.symlink(zf.read(info).decode("utf-8", "surrogateescape"), destination)
            else:
                with zf.open(info) as source, open(destination, "wb") as sink:
                    shutil.copyfileobj(source, sink, 1024 * 1024)
            written.append("/".join(parts))
    return written, skipped
