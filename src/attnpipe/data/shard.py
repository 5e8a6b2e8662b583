"""`shard`: write each split as WebDataset tar shards (+ `index.json`), pre-resized, byte-identical.

Shards are planned before any is written (how many, which samples in which), so each one can
be written by its own process and the result does not depend on scheduling.

`index.json` holds the class names and, per split, its sample count and shards. Each shard's
entry: `name`, `samples`, `classes` (count per class name), `bytes` (the file's size),
`offsets` (the byte offset in the tar of each sample's first header, samples in tar order) and
`end_offset` (where the end-of-archive marker starts, so sample i spans
`offsets[i]:offsets[i + 1]`, the last one `offsets[-1]:end_offset`). The offsets let a reader
seek straight to its share of a shard and stop after it (`attnpipe.data.loaders`); indexes
written before they existed still load, read from the start of each shard.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from attnpipe import storage
from attnpipe.config import Recipe, ShardConfig
from attnpipe.data import ray_tasks
from attnpipe.data.images import BadImage, load_rgb
from attnpipe.data.prepare import SPLITS, read_manifest
from attnpipe.data.shard_index import (  # noqa: F401 (the index API, also from here)
    INDEX_NAME,
    ShardError,
    read_index,
    read_index_bytes,
    shard_location,
    shard_urls,
)
from attnpipe.paths import PipelinePaths


@dataclass(frozen=True)
class ShardJob:
    """One tar file to write: its samples, in order."""

    path: Path
    rows: list[dict]
    root: Path
    image_size: int | None
    format: str
    jpeg_quality: int
    max_pixels: int
    jpeg_subsampling: str = "4:2:0"


def sample_key(image_id: str) -> str:
    """WebDataset splits member names at the first dot: escape dots (and slashes) in ids."""
    return image_id.replace("%", "%25").replace(".", "%2E").replace("/", "%2F")


def plan_shard_counts(n: int, total_bytes: int, config: ShardConfig) -> int:
    """Enough shards for maxcount/maxsize and at least `min_shards` (never more than samples)."""
    wanted = max(
        config.min_shards,
        math.ceil(n / config.maxcount),
        math.ceil(total_bytes / config.maxsize),
    )
    return max(1, min(wanted, n))


def shard(
    recipe: Recipe, paths: PipelinePaths, progress: bool = True, address: str | None = None
) -> dict:
    """Write `data/<name>/shards/` for every split and return the index.

    With `address`, the shards are encoded by Ray tasks on that cluster (see `ray_tasks`);
    the files written are the same, byte for byte.
    """
    config = recipe.shard
    manifest = read_manifest(paths.manifest).to_pylist()
    classes = json.loads(paths.classes.read_text())["classes"]
    out = paths.shards
    if out.exists():
        shutil.rmtree(out)  # stale shards of an earlier plan must not survive
    out.mkdir(parents=True)

    jobs: list[tuple[str, ShardJob]] = []
    for split in SPLITS:
        rows = sorted((r for r in manifest if r["split"] == split), key=lambda r: r["id"])
        if not rows:
            continue
        if split == "train":
            # Written pre-shuffled so that shard-level shuffling at read time mixes classes.
            order = np.random.default_rng(recipe.prepare.seed).permutation(len(rows))
            rows = [rows[i] for i in order]
        count = plan_shard_counts(len(rows), sum(r["bytes"] for r in rows), config)
        if count < config.min_shards:
            print(f"warning: split '{split}' has only {len(rows)} samples: {count} shard(s)")
        bounds = np.linspace(0, len(rows), count + 1).round().astype(int)
        for i in range(count):
            jobs.append(
                (
                    split,
                    ShardJob(
                        path=out / f"{split}-{i:05d}.tar",
                        rows=rows[bounds[i] : bounds[i + 1]],
                        root=paths.root,
                        image_size=config.image_size,
                        format=config.format,
                        jpeg_quality=config.jpeg_quality,
                        max_pixels=recipe.prepare.max_pixels,
                        jpeg_subsampling=config.jpeg_subsampling,
                    ),
                )
            )

    results = write_shards([job for _, job in jobs], config.workers, progress, address)
    index: dict = {"format": config.format, "classes": classes, "splits": {}}
    for (split, _), entry in zip(jobs, results, strict=True):
        entry["classes"] = {classes[int(k)]: v for k, v in sorted(entry["classes"].items())}
        block = index["splits"].setdefault(split, {"samples": 0, "shards": []})
        block["samples"] += entry["samples"]
        block["shards"].append(entry)
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return index


def write_shards(
    jobs: list[ShardJob], workers: int, progress: bool = True, address: str | None = None
) -> list[dict]:
    """Write every job's tar, in local processes or as Ray tasks; their entries, in order."""
    total = sum(len(job.rows) for job in jobs)
    with tqdm(total=total, desc="write shards", unit="img", disable=not progress) as bar:
        if address:
            return _write_shards_on_ray(jobs, address, bar)
        workers = workers or os.cpu_count() or 1
        if workers == 1 or len(jobs) == 1:
            return [_tick(bar, write_shard(job)) for job in jobs]
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            return [_tick(bar, entry) for entry in pool.map(write_shard, jobs)]


def _write_shards_on_ray(jobs: list[ShardJob], address: str, bar: tqdm) -> list[dict]:
    """Each job a Ray task: its images go in as bytes, its tar and entry come back."""
    entries: list[dict] = [{} for _ in jobs]
    nodes = set()
    inputs = (
        (job, ray_tasks.read_inputs(job.root, [row["path"] for row in job.rows])) for job in jobs
    )
    for position, (entry, data, node) in ray_tasks.run_tasks(_shard_task, inputs, address):
        jobs[position].path.write_bytes(data)
        entries[position] = _tick(bar, entry)
        nodes.add(node)
        ray_tasks.trace_task("shard", jobs[position].path.name, node)
    bar.write(f"wrote {len(jobs)} shard(s) with Ray tasks on {len(nodes)} node(s) of {address}")
    return entries


def _shard_task(job: ShardJob, images: dict[str, bytes]) -> tuple[dict, bytes, str]:
    """On a node: stage the images as the driver has them, `write_shard` there, return the tar."""
    with tempfile.TemporaryDirectory(prefix="attnpipe-shard-") as folder:
        root = Path(folder) / "root"
        ray_tasks.stage_files(root, images)
        rows = [{**row, "path": ray_tasks.staged_name(row["path"])} for row in job.rows]
        (Path(folder) / "out").mkdir()
        local = replace(job, rows=rows, root=root, path=Path(folder) / "out" / job.path.name)
        entry = write_shard(local)
        return entry, local.path.read_bytes(), ray_tasks.node_id()


def _tick(bar: tqdm, entry: dict) -> dict:
    bar.update(entry["samples"])
    return entry


def write_shard(job: ShardJob) -> dict:
    """Encode and write one tar with a fixed member order and `mtime=0`; return its index entry."""
    class_counts: dict[int, int] = {}
    offsets: list[int] = []
    with open(job.path, "wb") as handle, wds.TarWriter(handle, mtime=0) as writer:
        for row in job.rows:
            try:
                image = load_rgb(job.root / row["path"], job.max_pixels, job.image_size)
            except BadImage as bad:
                raise ShardError(
                    f"{row['path']} changed since prepare ({bad.reason}): re-run `attnpipe prepare`"
                ) from None
            if job.image_size:
                image = resize_shorter_side(image, job.image_size)
            meta = {
                "id": row["id"],
                "label": row["label"],
                "class_name": row["class_name"],
                "group": row["group"],
                "sha256": row["sha256"],
            }
            # Where this sample's first header (PAX or GNU name headers included) will start.
            offsets.append(writer.tarstream.offset)
            writer.write(
                {
                    "__key__": sample_key(row["id"]),
                    job.format: encode_image(
                        image, job.format, job.jpeg_quality, job.jpeg_subsampling
                    ),
                    "cls": str(row["label"]).encode(),
                    "json": json.dumps(meta, sort_keys=True).encode(),
                }
            )
            class_counts[row["label"]] = class_counts.get(row["label"], 0) + 1
        end_offset = writer.tarstream.offset  # the end-of-archive marker: the samples end here
    return {
        "name": job.path.name,
        "samples": len(job.rows),
        "classes": class_counts,
        "bytes": job.path.stat().st_size,
        "offsets": offsets,
        "end_offset": end_offset,
    }


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is `size` (aspect kept); never enlarges."""
    short = min(image.size)
    if short <= size:
        return image
    scale = size / short
    target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)


def encode_image(image: Image.Image, fmt: str, quality: int, subsampling: str = "4:2:0") -> bytes:
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", optimize=False)
    else:
        # Optimised Huffman tables: 5% fewer bytes and faster decoding, same pixels.
        image.save(buffer, format="JPEG", quality=quality, subsampling=subsampling, optimize=True)
    return buffer.getvalue()


def publish_shards(shards_dir: Path, url: str) -> dict:
    """Upload every shard of `shards_dir`, then its index, to `url`; return the index.

    The index goes last, so a reader never finds an index naming a shard not yet uploaded.
    Shards of an earlier plan that this index no longer names are removed, as `shard` does
    locally. Each upload is checked by size.
    """
    index = read_index(shards_dir)
    names = [entry["name"] for block in index["splits"].values() for entry in block["shards"]]
    for name in names:
        expected = (shards_dir / name).stat().st_size
        written = storage.upload_file(shards_dir / name, storage.join(url, name))
        if written != expected:
            raise ShardError(f"uploading {name} to {url}: wrote {written} of {expected} bytes")
    for name in storage.list_files(url):
        if name.endswith(".tar") and name not in names and name.split("-")[0] in SPLITS:
            storage.delete_file(storage.join(url, name))
    storage.upload_file(shards_dir / INDEX_NAME, storage.join(url, INDEX_NAME))
    return index
