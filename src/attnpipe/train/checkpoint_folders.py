"""Checkpoint folders on a filesystem, for launchers without Ray's checkpoint manager (torchrun).

A kill can come at any moment, also in the middle of a copy: a checkpoint is therefore copied
under a temporary name (`.partial-checkpoint_<n>`) and renamed into place once complete, and
resuming takes the newest folder whose file is whole. Only the newest `keep` are kept, like
Ray's `CheckpointConfig(num_to_keep)`.
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from pathlib import Path

from attnpipe.train.checkpoint import CHECKPOINT_FILE

PREFIX = "checkpoint_"
PARTIAL = ".partial-"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


class CheckpointFolders:
    """`storage/checkpoint_000001`, `..._000002`, ...: written whole or not at all."""

    def __init__(self, storage: Path, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"checkpoints to keep must be at least 1, got {keep}")
        self.storage, self.keep = storage, keep

    def numbered(self) -> list[tuple[int, Path]]:
        """Every final-named folder, oldest first (complete or not)."""
        if not self.storage.is_dir():
            return []
        found = [(_NAME.match(p.name), p) for p in self.storage.iterdir() if p.is_dir()]
        return sorted((int(m.group(1)), p) for m, p in found if m)

    def latest(self) -> Path | None:
        """The newest complete checkpoint: a folder cut short (a copy killed midway by a
        version that wrote in place, a truncated file) is passed over for the one before."""
        for _, folder in reversed(self.numbered()):
            if is_complete(folder):
                return folder
        return None

    def add(self, source: Path) -> Path:
        """Copy `source` in as the next checkpoint, then keep only the newest `keep`."""
        self.storage.mkdir(parents=True, exist_ok=True)
        self._remove_partials()  # left by a copy that a kill cut short
        numbered = self.numbered()
        final = self.storage / f"{PREFIX}{(numbered[-1][0] if numbered else 0) + 1:06d}"
        partial = self.storage / f"{PARTIAL}{final.name}"
        shutil.copytree(source, partial)
        _flush(partial)  # on disk before the name says it is complete
        os.replace(partial, final)
        for _, old in self.numbered()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _remove_partials(self) -> None:
        for leftover in self.storage.glob(f"{PARTIAL}*"):
            shutil.rmtree(leftover, ignore_errors=True)


def is_complete(folder: Path) -> bool:
    """Its checkpoint file is there and whole: `torch.save` writes a zip archive, whose
    directory is at its very end, so a truncated file fails this cheap check (nothing is
    loaded)."""
    path = folder / CHECKPOINT_FILE
    return path.is_file() and zipfile.is_zipfile(path)


def _flush(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
