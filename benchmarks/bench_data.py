"""Data throughput: writing shards and loading them, against per-file baselines, in one run.

    uv run python benchmarks/bench_data.py --images 400 --cores 2

Generates synthetic 800x600 JPEGs (gradients + smooth blobs + sensor-like noise, quality 90:
about the size of Cassava's photos), then measures, alternating ours and the baseline
(A-B-B-A...) and reporting each one's median over the runs:

1. Shard writing at 256 (shorter side), JPEG quality --jpeg-quality (90, as the recipes):
   - baseline: one process, one file per image (open, decode in full, resize, save);
   - ours: `attnpipe.data.shard.shard` (reduced-size JPEG decoding, one process per core).
2. Loading at 224 with the training augmentation (RandomResizedCrop 224 + flip + normalise):
   - baseline: a DataLoader over the original full-size JPEG files, one PIL decode per file
     (the seed notebooks' approach);
   - ours: `ShardStream` + `make_loader` over the 256-pixel shards, epoch after epoch (a
     training stream ends after its epoch; the DataLoader workers persist across epochs).
   Both with the same number of DataLoader worker processes (= --cores), batch 64, and also
   in a single process (workers=0, one torch thread) for a clean per-core number.

Throughput is images per wall-clock second; "per core" divides by the processes used. On a
shared machine the wall clock suffers from other people's work, so the images per CPU-second
(this process, its finished children from getrusage, live DataLoader workers from /proc) are
reported too: that is the per-core throughput the code reaches on a core of its own (or
better: contention also slows the CPU-seconds themselves, through shared caches).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from attnpipe.config import AugmentConfig, parse_recipe
from attnpipe.data.loaders import ShardStream, build_transform, make_loader, split_info
from attnpipe.data.prepare import prepare
from attnpipe.data.shard import shard
from attnpipe.paths import PipelinePaths

SHORT_SIDE = 256
INPUT = 224
BATCH = 64
AUGMENT = AugmentConfig()  # RandomResizedCrop(224, scale 0.08-1) + horizontal flip + ImageNet norm


@dataclass
class Measure:
    name: str
    images: int
    wall_s: float
    cpu_s: float
    processes: int

    @property
    def per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def per_core_s(self) -> float:
        return self.per_s / self.processes

    @property
    def per_cpu_s(self) -> float:
        return self.images / self.cpu_s


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of this process, its reaped children, and the live processes `pids`."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    for pid in pids:  # Linux: fields 14 and 15 of /proc/<pid>/stat, in clock ticks
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def timed(
    name: str, images: int, processes: int, run: Callable[[], None], pids: list[int] = ()
) -> Measure:
    wall, cpu = time.perf_counter(), cpu_seconds(list(pids))
    run()
    cpu = cpu_seconds(list(pids)) - cpu
    return Measure(name, images, time.perf_counter() - wall, cpu, processes)


# --------------------------------------------------------------------------- data
def synthetic_photo(seed: int, size=(800, 600)) -> bytes:
    """Gradients, smooth blobs, texture at a few scales and sensor noise: at quality 90 about
    the size of a Cassava photo (~120 KB at 800x600), so decoding costs what it would."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [x / w * 200 + 30, y / h * 160 + 50, (x + y) / (w + h) * 120 + 60], axis=-1
    ) * rng.uniform(0.6, 1.0, 3)
    for _ in range(12):  # smooth blobs: leaves, shadows
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(30, 200)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        base += blob * rng.uniform(-90, 90, 3)
    for cell, amplitude in ((24, 30.0), (6, 22.0), (2, 10.0)):  # texture: veins, edges, grain
        coarse = rng.normal(128, amplitude, (h // cell, w // cell, 3)).clip(0, 255)
        smooth = Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        base += np.asarray(smooth, np.float32) - 128
    base += rng.normal(0, 4, base.shape)  # sensor noise
    pixels = np.clip(base, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(0.8))  # lens softness
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_project(root: Path, images: int, cores: int, quality: int = 90):
    paths = PipelinePaths(root, "bench")
    folder = paths.raw / "train_images"
    if len(list(folder.glob("*.jpg"))) != images:  # a --workdir of an earlier run is reused
        shutil.rmtree(paths.raw, ignore_errors=True)
        folder.mkdir(parents=True)
        for i in range(images):
            (folder / f"{i:05d}.jpg").write_bytes(synthetic_photo(i))
    with (paths.raw / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "label"])
        for i in range(images):
            writer.writerow([f"{i:05d}.jpg", i % 5])
    (paths.raw / "label_num_to_disease_map.json").write_text(
        json.dumps({str(i): f"class{i}" for i in range(5)})
    )
    recipe = parse_recipe(
        {
            "source": {"kind": "kaggle-competition", "competition": "bench"},
            # Everything in train: the loader benchmark reads one split.
            "prepare": {"splits": {"train": 0.98, "val": 0.01, "test": 0.01}, "workers": cores},
            "shard": {
                "image_size": SHORT_SIDE,
                "format": "jpg",
                "jpeg_quality": quality,
                "maxcount": 100,
                "min_shards": 2 * cores,
                "workers": cores,
            },
            "model": {"name": "resnet50", "input_size": INPUT},
        },
        name="bench",
    )
    return recipe, paths


# --------------------------------------------------------------------------- shard writing
def per_image_resize_loop(files: list[Path], out: Path, quality: int) -> None:
    """The baseline: one process, open, decode fully, resize, save one file per image."""
    out.mkdir(parents=True, exist_ok=True)
    for path in files:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = SHORT_SIDE / min(image.size)
            size = (round(image.width * scale), round(image.height * scale))
            image.resize(size, Image.Resampling.BILINEAR).save(
                out / path.name, format="JPEG", quality=quality
            )


# --------------------------------------------------------------------------- loading
class PerFileDataset(Dataset):
    """The baseline loader: the original JPEG files, one PIL decode each, then the same
    augmentation. Indexes wrap around so that it can run as long as the shard stream."""

    def __init__(self, files: list[Path], length: int):
        self.files, self.length = files, length
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(
                    INPUT, scale=AUGMENT.random_resized_crop_scale, antialias=True
                ),
                v2.RandomHorizontalFlip(AUGMENT.horizontal_flip),
                v2.PILToTensor(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(AUGMENT.mean, AUGMENT.std),
            ]
        )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        with Image.open(self.files[index % len(self.files)]) as image:
            return self.transform(image.convert("RGB")), index % 5


def drain(loader, batches: int, warmup: int) -> tuple[Callable[[], None], list[int]]:
    """Iterate `warmup` batches (worker start-up), then return a runner for `batches` more
    and the worker process ids (their CPU time is counted while they are alive)."""
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)

    def run() -> None:
        for _ in range(batches):
            images, *_ = next(iterator)
            assert images.shape[1:] == (3, INPUT, INPUT)

    import multiprocessing

    return run, [child.pid for child in multiprocessing.active_children()]


def epochs(stream: ShardStream, loader: Iterable) -> Iterator:
    """The batches of epoch after epoch, as a training loop takes them."""
    for epoch in itertools.count():
        stream.set_epoch(epoch)
        yield from loader


def loader_measures(files, paths, cores: int, batches: int) -> tuple[Measure, Measure]:
    workers = cores
    warmup = max(2, 2 * workers)
    stream = ShardStream(
        split_info(paths.shards, "train").shards,
        rank=0,
        world_size=1,
        transform=build_transform(AUGMENT, INPUT, train=True),
        train=True,
        shuffle_buffer=256,
    )
    ours_loader = epochs(stream, make_loader(stream, BATCH, workers, persistent=True))
    ours = timed(
        f"ours: shards, {workers} workers",
        batches * BATCH,
        max(workers, 1),
        *drain(ours_loader, batches, warmup),
    )
    ours_loader.close()  # its loader, and with it the DataLoader workers, go now
    del ours_loader
    base_loader = DataLoader(
        PerFileDataset(files, (batches + warmup + 1) * BATCH),
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
    )
    base = timed(
        f"baseline: JPEG files, {workers} workers",
        batches * BATCH,
        max(workers, 1),
        *drain(base_loader, batches, warmup),
    )
    return ours, base


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batches", type=int, default=30, help="timed loader batches per run")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="of the shards (recipes: 90)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per process, in every measurement

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_"))
    print(f"generating {args.images} synthetic 800x600 JPEGs in {root} ...", flush=True)
    recipe, paths = make_project(root, args.images, args.cores, args.jpeg_quality)
    files = sorted((paths.raw / "train_images").glob("*.jpg"))
    mean_kb = sum(f.stat().st_size for f in files) / len(files) / 1024
    prep = timed("prepare", len(files), args.cores, lambda: prepare(recipe, paths, progress=False))

    results: dict[str, list[Measure]] = {}

    def record(measure: Measure) -> None:
        results.setdefault(measure.name, []).append(measure)
        print(
            f"  {measure.name:<40} {measure.per_s:8.1f} img/s  {measure.per_core_s:8.1f} /core"
            f"  {measure.per_cpu_s:8.1f} /CPU-s",
            flush=True,
        )

    print(f"shard writing (800x600 -> shorter side 256, JPEG q{args.jpeg_quality}):", flush=True)
    for repeat in range(args.repeats):
        order = ["ours", "base", "ours1"] if repeat % 2 == 0 else ["base", "ours1", "ours"]
        for what in order:
            if what == "base":
                out = root / "resized"
                shutil.rmtree(out, ignore_errors=True)
                record(
                    timed(
                        "baseline: per-image loop, 1 process",
                        len(files),
                        1,
                        lambda out=out: per_image_resize_loop(files, out, args.jpeg_quality),
                    )
                )
            else:
                cores = args.cores if what == "ours" else 1
                run_recipe = recipe.model_copy(
                    update={"shard": recipe.shard.model_copy(update={"workers": cores})}
                )
                record(
                    timed(
                        f"ours: shard(), {cores} process(es)",
                        len(files),
                        cores,
                        lambda r=run_recipe: shard(r, paths, progress=False),
                    )
                )

    print(f"loading at {INPUT} with RandomResizedCrop + flip + normalise:", flush=True)
    for repeat in range(args.repeats):
        for workers in (args.cores, 0):
            ours, base = loader_measures(files, paths, workers, args.batches)
            for measure in (ours, base) if repeat % 2 == 0 else (base, ours):
                record(measure)

    def median(name: str, key: str) -> float:
        return statistics.median(getattr(m, key) for m in results[name])

    names = {
        "shard_ours": f"ours: shard(), {args.cores} process(es)",
        "shard_ours_1": "ours: shard(), 1 process(es)",
        "shard_baseline": "baseline: per-image loop, 1 process",
        "load_ours": f"ours: shards, {args.cores} workers",
        "load_baseline": f"baseline: JPEG files, {args.cores} workers",
        "load_ours_1": "ours: shards, 0 workers",
        "load_baseline_1": "baseline: JPEG files, 0 workers",
    }
    table = {
        key: {
            "name": name,
            "runs": len(results[name]),
            "processes": results[name][0].processes,
            "images_per_s": median(name, "per_s"),
            "images_per_s_per_core": median(name, "per_core_s"),
            "images_per_cpu_s": median(name, "per_cpu_s"),
        }
        for key, name in names.items()
    }

    def ratio(ours: str, base: str, key: str) -> float:
        return table[ours][key] / table[base][key]

    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "cores_used": args.cores,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "load_average_1m_at_end": os.getloadavg()[0],
            "python": sys.version.split()[0],
            "torch": torch.__version__,
        },
        "images": len(files),
        "jpeg_quality": args.jpeg_quality,
        "mean_source_kb": round(mean_kb, 1),
        "shard_bytes_mean_kb": round(
            sum(p.stat().st_size for p in paths.shards.glob("train-*.tar"))
            / split_info(paths.shards, "train").samples
            / 1024,
            1,
        ),
        "prepare": asdict(prep) | {"per_s": prep.per_s},
        "medians": table,
        "ratios (medians)": {
            "shard, per core (1 process each), wall": ratio(
                "shard_ours_1", "shard_baseline", "images_per_s"
            ),
            "shard, per CPU-second": ratio("shard_ours_1", "shard_baseline", "images_per_cpu_s"),
            f"shard, {args.cores} processes vs 1-process baseline, wall": ratio(
                "shard_ours", "shard_baseline", "images_per_s"
            ),
            f"loader, {args.cores} workers each, wall": ratio(
                "load_ours", "load_baseline", "images_per_s"
            ),
            f"loader, {args.cores} workers each, per CPU-second": ratio(
                "load_ours", "load_baseline", "images_per_cpu_s"
            ),
            "loader, single process, wall": ratio("load_ours_1", "load_baseline_1", "images_per_s"),
            "loader, single process, per CPU-second": ratio(
                "load_ours_1", "load_baseline_1", "images_per_cpu_s"
            ),
        },
        "runs": {
            name: [asdict(m) | {"per_s": m.per_s, "per_cpu_s": m.per_cpu_s} for m in ms]
            for name, ms in results.items()
        },
    }
    print(json.dumps({k: report[k] for k in ("machine", "medians", "ratios (medians)")}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
