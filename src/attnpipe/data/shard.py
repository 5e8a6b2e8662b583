"""`shard`: write each split as WebDataset tar shards (+ an index), pre-resized, byte-identical.

Shards are planned before any is written (how many, which samples in which), so each one can
be written by its own process and the result does not depend on scheduling.

The index is compact, so that a rank reads what it needs: `index.json` holds the class names
and, per split, its sample count, its count per class and its shards (`name`, `samples`,
`bytes`, `offsets_file`). Each shard's sample offsets are in a side file beside it
(`<shard>.idx`: little-endian int64, the byte offset in the tar of each sample's first
header, samples in tar order, then where the end-of-archive marker starts), so sample i spans
`offsets[i]:offsets[i + 1]`. A reader seeks straight to its share of a shard and stops after
it (`attnpipe.data.loaders`), reading only the side files of the shards it touches. At 1.28M
samples `index.json` is about 100 KB where the one with inline offsets was 49 MB. Indexes with
inline offsets (and older ones, with none) still load.

Memory: the manifest stays a columnar Arrow table (a slice per shard), never a list of dicts.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from tqdm import tqdm

from attnpipe import storage
from attnpipe.config import Recipe, ShardConfig
from attnpipe.data import ray_tasks
from attnpipe.data.images import BadImage, load_rgb
from attnpipe.data.pools import process_pool
from attnpipe.data.prepare import SPLITS, read_manifest
from attnpipe.data.shard_index import (  # noqa: F401 (the index API, also from here)
    INDEX_NAME,
    OFFSETS_SUFFIX,
    ShardError,
    read_index,
    read_index_bytes,
    shard_location,
    shard_urls,
)
from attnpipe.data.tar_writer import ShardTarWriter
from attnpipe.paths import PipelinePaths

ROW_COLUMNS = ("id", "path", "label", "class_name", "group", "sha256")  # what a tar holds
UPLOAD_THREADS = 8  # parallel uploads when publishing: object stores scale with connections


@dataclass(frozen=True)
class ShardJob:
    """One tar file to write: its samples, in order (an Arrow table of `ROW_COLUMNS`, or a
    list of row dicts), read from `root` (a folder, or an object-store URL)."""

    path: Path
    rows: pa.Table | list[dict]
    root: Path | str
    image_size: int | None
    format: str
    jpeg_quality: int
    max_pixels: int
    jpeg_subsampling: str = "4:2:0"

    def row_dicts(self) -> list[dict]:
        return self.rows.to_pylist() if isinstance(self.rows, pa.Table) else self.rows


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


def split_rows(manifest: pa.Table, split: str, seed: int) -> pa.Table:
    """A split's rows in shard order: by id; training pre-shuffled with the prepare seed (so
    that shard-level shuffling at read time mixes classes)."""
    chosen = pc.indices_nonzero(pc.equal(manifest["split"], split))
    ids = manifest["id"].take(chosen)
    order = chosen.take(pc.sort_indices(ids))  # manifest rows of the split, by id
    if split == "train" and len(order):
        order = order.take(np.random.default_rng(seed).permutation(len(order)))
    return manifest.select(list(ROW_COLUMNS)).take(order)


def plan_jobs(
    recipe: Recipe, manifest: pa.Table, out: Path, root: Path | str
) -> list[tuple[str, ShardJob]]:
    """Every tar of every split, before any is written: (split, job)."""
    config = recipe.shard
    jobs: list[tuple[str, ShardJob]] = []
    for split in SPLITS:
        rows = split_rows(manifest, split, recipe.prepare.seed)
        if not rows.num_rows:
            continue
        in_split = pc.equal(manifest["split"], split)
        total_bytes = pc.sum(pc.if_else(in_split, manifest["bytes"], 0)).as_py() or 0
        count = plan_shard_counts(rows.num_rows, total_bytes, config)
        if count < config.min_shards:
            print(f"warning: split '{split}' has only {rows.num_rows} samples: {count} shard(s)")
        bounds = np.linspace(0, rows.num_rows, count + 1).round().astype(int)
        for i in range(count):
            job = ShardJob(
                path=out / f"{split}-{i:05d}.tar",
                # A copy of just these rows: a slice would pickle (to a worker or a Ray task)
                # with the whole split's buffers.
                rows=rows.take(np.arange(bounds[i], bounds[i + 1])),
                root=root,
                image_size=config.image_size,
                format=config.format,
                jpeg_quality=config.jpeg_quality,
                max_pixels=recipe.prepare.max_pixels,
                jpeg_subsampling=config.jpeg_subsampling,
            )
            jobs.append((split, job))
    return jobs


def shard(
    recipe: Recipe,
    paths: PipelinePaths,
    progress: bool = True,
    address: str | None = None,
    shared_root: str | None = None,
) -> dict:
    """Write `data/<name>/shards/` for every split and return the index.

    With `address`, the shards are written by Ray tasks on that cluster, each reading its
    images from the project folder as the nodes see it (`shared_root`, see `ray_tasks`) and
    writing its tar there itself; the files are the same, byte for byte.
    """
    manifest = read_manifest(paths.manifest).select([*ROW_COLUMNS, "split", "bytes"])
    classes = json.loads(paths.classes.read_text())["classes"]
    out = paths.shards
    if out.exists():
        shutil.rmtree(out)  # stale shards of an earlier plan must not survive
    out.mkdir(parents=True)
    jobs = plan_jobs(recipe, manifest, out, paths.root)
    del manifest  # the jobs hold slices of what they need
    target = None
    if address:
        target = SharedTarget(
            ray_tasks.shared_root(paths.root, shared_root),
            _relative(out, paths.root),
            _relative(paths.raw, paths.root),
        )
    workers = recipe.shard.workers
    results = write_shards([job for _, job in jobs], workers, progress, address, target)
    splits = [split for split, _ in jobs]
    index = build_index(recipe.shard.format, classes, zip(splits, results, strict=True))
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    if target is not None and storage.is_url(target.root):
        storage.upload_file(out / INDEX_NAME, storage.join(target.folder, INDEX_NAME))
    return index


def build_index(fmt: str, classes: list[str], entries: Iterable[tuple[str, dict]]) -> dict:
    """`index.json` from (split, `write_shard` entry) pairs in shard order."""
    index: dict = {"format": fmt, "classes": classes, "splits": {}}
    for split, entry in entries:
        block = index["splits"].setdefault(
            split, {"samples": 0, "class_counts": dict.fromkeys(classes, 0), "shards": []}
        )
        block["samples"] += entry["samples"]
        for label, count in entry["classes"].items():
            block["class_counts"][classes[int(label)]] += count
        block["shards"].append({k: entry[k] for k in ("name", "samples", "bytes", "offsets_file")})
    return index


def _relative(path: Path, root: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


@dataclass(frozen=True)
class SharedTarget:
    """Where a cluster's tasks read and write: the shared project folder (`root`), the shards
    folder below it, and a file every node must see (to tell a node without the shared
    folder from an image gone since prepare)."""

    root: str
    shards: str
    probe: str

    @property
    def folder(self) -> str:
        return ray_tasks.shared_location(self.root, self.shards)


def write_shards(
    jobs: list[ShardJob],
    workers: int,
    progress: bool = True,
    address: str | None = None,
    target: SharedTarget | None = None,
) -> list[dict]:
    """Write every job's tar, in local processes or as Ray tasks; their entries, in order."""
    total = sum(len(job.rows) for job in jobs)
    with tqdm(total=total, desc="write shards", unit="img", disable=not progress) as bar:
        if address:
            return _write_shards_on_ray(jobs, address, bar, target)
        workers = workers or os.cpu_count() or 1
        if workers == 1 or len(jobs) == 1:
            return [_tick(bar, write_shard(job)) for job in jobs]
        with process_pool(min(workers, len(jobs)), __name__) as pool:
            return [_tick(bar, entry) for entry in pool.map(write_shard, jobs)]


def _write_shards_on_ray(
    jobs: list[ShardJob], address: str, bar: tqdm, target: SharedTarget | None
) -> list[dict]:
    """Each job a Ray task: its plan goes in (a slice of the manifest), the task reads the
    images and writes the tar and its offsets itself, and only the entry comes back."""
    if target is None:
        root = jobs[0].path.parent.parent if jobs else Path()
        target = SharedTarget(str(root.resolve()), _relative(jobs[0].path.parent, root), ".")
    entries: list[dict] = [{} for _ in jobs]
    nodes = set()
    inputs = ((replace(job, root=target.root), target) for job in jobs)
    for done in ray_tasks.run_tasks(_shard_task, inputs, address):
        entry, node = done.result
        entries[done.position] = _tick(bar, entry)
        nodes.add(node)
        ray_tasks.trace_task("shard", jobs[done.position].path.name, done, node)
    bar.write(f"wrote {len(jobs)} shard(s) with Ray tasks on {len(nodes)} node(s) of {address}")
    return entries


def _shard_task(job: ShardJob, target: SharedTarget) -> tuple[dict, str]:
    """On a node: `write_shard` from the shared folder into it (or, on object storage, into a
    temporary folder, then uploaded there)."""
    if not storage.is_url(target.root):
        try:
            return write_shard(replace(job, path=Path(target.folder) / job.path.name)), _node()
        except ShardError as error:
            if "(missing file)" in str(error):
                ray_tasks.check_visible(target.root, target.probe)
            raise
    with tempfile.TemporaryDirectory(prefix="attnpipe-shard-") as folder:
        local = replace(job, path=Path(folder) / job.path.name)
        entry = write_shard(local)
        for path in (local.path, local.path.with_suffix(OFFSETS_SUFFIX)):
            storage.upload_file(path, storage.join(target.folder, path.name))
        return entry, _node()


def _node() -> str:
    return ray_tasks.node_id()


def _tick(bar: tqdm, entry: dict) -> dict:
    bar.update(entry["samples"])
    return entry


def write_shard(job: ShardJob) -> dict:
    """Encode and write one tar with a fixed member order and `mtime=0`, and its offsets side
    file; return its index entry (with `classes`: count per label)."""
    class_counts: dict[int, int] = {}
    offsets: list[int] = []
    root = str(job.root)
    with open(job.path, "wb") as handle, ShardTarWriter(handle) as writer:
        for row in job.row_dicts():
            location = ray_tasks.shared_location(root, row["path"])
            try:
                image = load_rgb(location, job.max_pixels, job.image_size)
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
            offsets.append(writer.offset)
            writer.write(
                sample_key(row["id"]),
                {
                    job.format: encode_image(
                        image, job.format, job.jpeg_quality, job.jpeg_subsampling
                    ),
                    "cls": str(row["label"]).encode(),
                    "json": json.dumps(meta, sort_keys=True).encode(),
                },
            )
            class_counts[row["label"]] = class_counts.get(row["label"], 0) + 1
        offsets.append(writer.offset)  # the end-of-archive marker: samples end here
    offsets_path = job.path.with_suffix(OFFSETS_SUFFIX)
    offsets_path.write_bytes(np.asarray(offsets, dtype="<i8").tobytes())
    return {
        "name": job.path.name,
        "samples": len(offsets) - 1,
        "classes": class_counts,
        "bytes": job.path.stat().st_size,
        "offsets_file": offsets_path.name,
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
    """Upload every shard of `shards_dir` and its offsets, then its index, to `url`; return
    the index.

    Uploads run in parallel (`UPLOAD_THREADS`). The index goes last, so a reader never finds
    an index naming a shard not yet uploaded. Shards of an earlier plan that this index no
    longer names are removed, as `shard` does locally. Each upload is checked by size.
    """
    index = read_index(shards_dir)
    entries = [entry for block in index["splits"].values() for entry in block["shards"]]
    names = [entry["name"] for entry in entries]
    names += [entry["offsets_file"] for entry in entries if "offsets_file" in entry]
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        written_sizes = pool.map(lambda name: _upload(shards_dir, name, url), names)
        for name, written in zip(names, written_sizes, strict=True):
            expected = (shards_dir / name).stat().st_size
            if written != expected:
                raise ShardError(f"uploading {name} to {url}: wrote {written} of {expected} bytes")
    for name in storage.list_files(url):
        ours = name.endswith((".tar", OFFSETS_SUFFIX)) and name.split("-")[0] in SPLITS
        if ours and name not in names:
            storage.delete_file(storage.join(url, name))
    storage.upload_file(shards_dir / INDEX_NAME, storage.join(url, INDEX_NAME))
    return index


def _upload(shards_dir: Path, name: str, url: str) -> int:
    return storage.upload_file(shards_dir / name, storage.join(url, name))
