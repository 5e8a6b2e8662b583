"""The scan step of `prepare`: every image decoded once, its facts or why it is unusable.

In worker processes on this machine, or as Ray tasks on a cluster that read the images from the
project folder as the nodes see it (`ray_tasks`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
from tqdm import tqdm

from attnpipe.data import ray_tasks
from attnpipe.data.images import BadImage, ImageInfo, inspect
from attnpipe.data.pools import process_pool

SEQUENTIAL_BELOW = 64  # fewer images than this are scanned in-process: a pool costs more
SCAN_TASK_IMAGES = 64  # images per Ray task: enough to outweigh its scheduling cost


def scan_images(
    paths: Sequence[Path | str],
    max_pixels: int,
    workers: int = 0,
    progress: bool = True,
    address: str | None = None,
    shared: SharedProject | None = None,
) -> ScanFacts:
    """Decode every image in parallel processes, or as Ray tasks on the cluster at `address`
    (reading the images from `shared`: by default the folder above the first image's).

    Each image's facts or why it is bad, columnar: chunks of `SCAN_TASK_IMAGES` images go to
    the workers as names and come back as a few arrays (no per-image objects cross processes,
    and a million images' facts take tens of MB, not hundreds).
    """
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(paths), desc="scan images", unit="img", disable=not progress)
    with bar:
        if address:
            if shared is None:  # the folder holding every image, as the nodes see it
                # Absolute, symlinks kept, as `workspace_name` keeps them.
                folders = [os.path.dirname(os.path.abspath(p)) for p in paths] or [os.getcwd()]
                root = Path(os.path.commonpath(folders))
                shared = SharedProject(str(root), root, ".")
            return _scan_on_ray(paths, max_pixels, address, bar, shared)
        names = [str(path) for path in paths]
        chunks = [names[i : i + SCAN_TASK_IMAGES] for i in range(0, len(names), SCAN_TASK_IMAGES)]
        parts: list[ScanFacts] = []
        if workers == 1 or len(paths) < SEQUENTIAL_BELOW:
            for chunk in chunks:
                parts.append(_scan_chunk(chunk, max_pixels))
                bar.update(len(chunk))
        else:
            with process_pool(workers, __name__) as pool:
                for facts in pool.map(_scan_chunk, chunks, [max_pixels] * len(chunks)):
                    parts.append(facts)
                    bar.update(len(facts.modes))
    return ScanFacts.concat(parts)


def _scan_chunk(names: list[str], max_pixels: int) -> ScanFacts:
    return ScanFacts.of([_scan_one(name, max_pixels) for name in names])


def _scan_one(path: Path | str, max_pixels: int) -> ImageInfo | BadImage:
    try:
        return inspect(path, max_pixels)
    except BadImage as bad:
        return bad


def _scan_on_ray(
    paths: Sequence[Path | str], max_pixels: int, address: str, bar: tqdm, shared: SharedProject
) -> ScanFacts:
    """Chunks of images as Ray tasks: their names go in, their facts (or reasons) come back.

    Each task reads its images from the shared project folder itself; the driver never
    touches an image's bytes.
    """
    chunks = [
        range(i, min(i + SCAN_TASK_IMAGES, len(paths)))
        for i in range(0, len(paths), SCAN_TASK_IMAGES)
    ]
    results: list[ScanFacts | None] = [None] * len(chunks)
    nodes = set()
    inputs = (
        (shared.root, [shared.name(paths[i]) for i in chunk], max_pixels, shared.probe)
        for chunk in chunks
    )
    for done in ray_tasks.run_tasks(_scan_task, inputs, address):
        facts, node = done.result
        chunk = chunks[done.position]
        results[done.position] = facts
        bar.update(len(chunk))
        nodes.add(node)
        ray_tasks.trace_task("scan", f"{chunk.start}-{chunk.stop}", done, node)
    bar.write(f"scanned {len(paths)} image(s) with Ray tasks on {len(nodes)} node(s) of {address}")
    return ScanFacts.concat(cast(list[ScanFacts], results))  # every chunk answered


@dataclass(frozen=True)
class SharedProject:
    """The project folder as the cluster's nodes see it (`ray_tasks.shared_root`)."""

    root: str  # a path on a shared file system, or an object-store URL
    project_root: Path  # the same folder on the driver
    probe: str  # a folder every node must see (the raw images'), relative to the root

    def name(self, path: Path | str) -> str:
        return workspace_name(path, self.project_root)


@dataclass(frozen=True)
class ScanFacts:
    """A chunk's image facts, columnar (about 60 bytes an image through the object store,
    where a list of `ImageInfo` objects pickles to 250)."""

    sizes: np.ndarray  # int64 (width, height, bytes) per image
    digests: bytes  # 32 raw bytes of sha256 per image
    modes: list[str]
    formats: list[str]
    bad: dict[int, str]  # position in the chunk -> why the image is unusable

    @classmethod
    def of(cls, infos: Sequence[ImageInfo | BadImage]) -> ScanFacts:
        good = [info if isinstance(info, ImageInfo) else None for info in infos]
        return cls(
            sizes=np.array([(i.width, i.height, i.bytes) if i else (0, 0, 0) for i in good]),
            digests=b"".join(bytes.fromhex(i.sha256) if i else bytes(32) for i in good),
            modes=[sys.intern(i.mode) if i else "" for i in good],
            formats=[sys.intern(i.format) if i else "" for i in good],
            bad={n: info.reason for n, info in enumerate(infos) if isinstance(info, BadImage)},
        )

    @classmethod
    def concat(cls, parts: Sequence[ScanFacts]) -> ScanFacts:
        bad, start = {}, 0
        for part in parts:
            bad.update({start + n: reason for n, reason in part.bad.items()})
            start += len(part.modes)
        return cls(
            sizes=np.concatenate([p.sizes.reshape(-1, 3) for p in parts] or [np.zeros((0, 3))]),
            digests=b"".join(p.digests for p in parts),
            modes=[mode for p in parts for mode in p.modes],
            formats=[fmt for p in parts for fmt in p.formats],
            bad=bad,
        )

    def sha256(self, row: int) -> str:
        return self.digests[32 * row : 32 * row + 32].hex()


def _scan_task(root: str, names: list[str], max_pixels: int, probe: str) -> tuple[ScanFacts, str]:
    """On a node: each image read from the shared project folder and inspected as a local run
    does (the same reasons for a bad one)."""
    infos = [_scan_one(ray_tasks.shared_location(root, name), max_pixels) for name in names]
    if any(isinstance(info, BadImage) and info.reason == "missing file" for info in infos):
        ray_tasks.check_visible(root, probe)  # a node without the shared folder is not "missing"
    return ScanFacts.of(infos), ray_tasks.node_id()


def workspace_name(path: Path | str, root: Path | str) -> str:
    """`path` relative to `root` when inside it, else as given. Text, not Path objects, and no
    symlinks followed: it runs once per image, and a file DVC linked to its cache keeps its
    workspace name."""
    absolute, base = os.path.abspath(path), os.path.abspath(root)
    inside = os.path.join(base, "")  # with its trailing separator (also for "/")
    if absolute.startswith(inside):
        return absolute[len(inside) :]
    return "." if absolute == base else str(path)
