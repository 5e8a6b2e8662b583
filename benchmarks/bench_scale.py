"""Scale benchmarks for ImageNet-sized work (issue 20), in parts (`--part data|metrics|all`).

    uv run python benchmarks/bench_scale.py --part data --sizes 2000 10000 --cores 2
    uv run python benchmarks/bench_scale.py --part metrics     # validation/evaluation metrics
    uv run python benchmarks/bench_scale.py --part metrics --samples 5000 --classes 100  # quick

Part `data`: synthetic ImageNet-shaped data (photo-sized 400x300 JPEGs, 1,000 classes, the
cassava layout) at each size in --sizes; for each, `prepare` and `shard` (shorter side 256,
JPEG 90, 1,000 samples per shard) each run in a fresh process, measuring its wall time, CPU
time and peak memory (the stage's own process, and its largest worker); then one rank's
start-up: reading `index.json` and the offsets of the shards its share touches (rank 0 of 16,
4 loader workers). Baselines in the same run: one core's floor for the same per-image work, in
one process (`prepare`: decode + checks + sha256, `attnpipe.data.images.inspect`; `shard`:
reduced-size decode + resize + JPEG encode). Reported, from the two largest sizes (the slope,
so start-up costs cancel): added wall seconds per image and its ratio to the floor (1.0: one
core's worth of work; 1/cores: every core busy), added peak memory per image; and the
extrapolation to 1.28M and 12.8M images on a 16-core node (the slope scaled by cores/16: the
stages use every core), with the index sizes and a rank's start-up.

Part `metrics`: validation and evaluation metrics at 50,000 x 1,000 over 8 simulated ranks,
per-rank time and memory, against the old gather-everything way as the baseline in the same
run (benchmarks/scale_metrics.py). `--part all` runs both. Results: docs/benchmarks.md.

The images are distinct files (each a photo from a pool of 64 with its own JPEG comment), so
prepare's duplicate check keeps them all; decoding costs what a photo of that size costs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_data import synthetic_photo
from scale_metrics import metrics_report

from attnpipe.config import parse_recipe
from attnpipe.paths import PipelinePaths

CLASSES = 1000
PHOTO = (400, 300)
POOL = 64
SHORT_SIDE = 256
TARGETS = (1_281_167, 12_811_670)  # ImageNet-1k's training images, and ten times that
NODE_CORES = 16
RANKS, LOADER_WORKERS = 16, 4


# --------------------------------------------------------------------------- data
def with_comment(jpeg: bytes, text: str) -> bytes:
    """The same image with a COM segment after SOI: different bytes (and sha256), same pixels."""
    body = text.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(body) + 2).to_bytes(2, "big") + body + jpeg[2:]


def make_dataset(root: Path, images: int, cores: int) -> PipelinePaths:
    paths = PipelinePaths(root, "scale")
    folder = paths.raw / "train_images"
    folder.mkdir(parents=True)
    pool = [synthetic_photo(seed, PHOTO) for seed in range(POOL)]
    with (paths.raw / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "label"])
        for i in range(images):
            name = f"{i:07d}.jpg"
            (folder / name).write_bytes(with_comment(pool[i % POOL], name))
            writer.writerow([name, i % CLASSES])
    (paths.raw / "label_num_to_disease_map.json").write_text(
        json.dumps({str(i): f"n{i:08d}" for i in range(CLASSES)})
    )
    (root / "pipelines").mkdir(exist_ok=True)
    (root / "pipelines" / "scale.json").write_text(json.dumps(recipe_dict(cores)))
    return paths


def recipe_dict(cores: int) -> dict:
    return {
        "source": {"kind": "kaggle-competition", "competition": "scale"},
        "prepare": {"workers": cores, "max_reject_fraction": 0.0},
        "shard": {
            "image_size": SHORT_SIDE,
            "format": "jpg",
            "jpeg_quality": 90,
            "maxcount": 1000,
            "min_shards": 4,
            "workers": cores,
        },
        "model": {"name": "attention56"},
    }


# --------------------------------------------------------------------------- one stage
def run_stage(stage: str, root: Path) -> dict:
    """In this (fresh) process: one stage, its wall and CPU seconds and peak memory."""
    from attnpipe.data.prepare import prepare
    from attnpipe.data.shard import shard

    cores = json.loads((root / "pipelines" / "scale.json").read_text())["prepare"]["workers"]
    recipe = parse_recipe(recipe_dict(cores), name="scale")
    paths = PipelinePaths(root, "scale")
    start = time.perf_counter()
    (prepare if stage == "prepare" else shard)(recipe, paths, progress=False)
    wall = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "wall_s": wall,
        "cpu_s": own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
        "peak_rss_mb": own.ru_maxrss / 1024,
        "worker_peak_rss_mb": children.ru_maxrss / 1024,
    }


def stage_in_subprocess(stage: str, root: Path) -> dict:
    command = [sys.executable, __file__, "--run-stage", stage, "--root", str(root)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def rank_startup(shards: Path) -> dict:
    """Rank 0 of RANKS: read index.json, plan the epoch, load the offsets its share needs."""
    from attnpipe.config import AugmentConfig
    from attnpipe.data.loaders import ShardStream, build_transform, split_info

    start = time.perf_counter()
    info = split_info(shards, "train")
    stream = ShardStream(
        info.shards,
        rank=0,
        world_size=RANKS,
        transform=build_transform(AugmentConfig(), 224, train=True),
        train=True,
    )
    touched = set()
    for worker in range(LOADER_WORKERS):
        for segment in stream.plan(LOADER_WORKERS, 64).segments(0, worker):
            touched.add(segment.shard)
    loaded = [info.shards[i].with_offsets() for i in sorted(touched)]
    seconds = time.perf_counter() - start
    side = sum(8 * (entry.samples + 1) for entry in loaded)
    return {
        "startup_s": seconds,
        "index_bytes": (shards / "index.json").stat().st_size,
        "offsets_bytes_read": side,
        "shards": len(info.shards),
        "entry_bytes": shard_entry_bytes(shards),
        "inline_index_bytes": inline_index_size(shards),
    }


def shard_entry_bytes(shards: Path) -> float:
    """Bytes one shard's entry adds to index.json (as written, indented)."""
    index = json.loads((shards / "index.json").read_text())
    entries = [entry for block in index["splits"].values() for entry in block["shards"]]
    return len(json.dumps({"s": entries}, indent=2)) / len(entries)


def inline_index_size(shards: Path) -> int:
    """What index.json would weigh with every sample's offset and per-shard class counts
    inline (the format before side files): the same data, as JSON."""
    index = json.loads((shards / "index.json").read_text())
    for block in index["splits"].values():
        for entry in block["shards"]:
            offsets = np.frombuffer((shards / entry["offsets_file"]).read_bytes(), "<i8")
            entry["offsets"], entry["end_offset"] = offsets[:-1].tolist(), int(offsets[-1])
            entry["classes"] = {f"n{i:08d}": 1 for i in range(min(CLASSES, entry["samples"]))}
    return len(json.dumps(index, indent=2))


# --------------------------------------------------------------------------- baselines
def floor_per_image(files: list[Path], work: Callable[[Path], object]) -> tuple[float, float]:
    """One core's (wall, CPU) seconds per image for `work`, in this process (best of two)."""
    best, best_cpu = float("inf"), float("inf")
    for _ in range(2):
        start, cpu = time.perf_counter(), time.process_time()
        for path in files:
            work(path)
        best = min(best, (time.perf_counter() - start) / len(files))
        best_cpu = min(best_cpu, (time.process_time() - cpu) / len(files))
    return best, best_cpu


def floors(paths: PipelinePaths, sample: int) -> dict:
    from attnpipe.data.images import inspect, load_rgb
    from attnpipe.data.shard import encode_image, resize_shorter_side

    files = sorted((paths.raw / "train_images").iterdir())[:sample]

    def shard_one(path: Path) -> bytes:
        image = resize_shorter_side(load_rgb(path, 10**9, SHORT_SIDE), SHORT_SIDE)
        return encode_image(image, "jpg", 90)

    prepare_wall, prepare_cpu = floor_per_image(files, lambda p: inspect(p, 10**9))
    shard_wall, shard_cpu = floor_per_image(files, shard_one)
    return {
        "prepare_floor_s": prepare_wall,
        "prepare_floor_cpu_s": prepare_cpu,
        "shard_floor_s": shard_wall,
        "shard_floor_cpu_s": shard_cpu,
    }


# --------------------------------------------------------------------------- the part
def data_part(sizes: list[int], cores: int, workdir: Path) -> dict:
    runs = []
    base = None
    for size in sizes:
        root = Path(tempfile.mkdtemp(prefix=f"scale-{size}-", dir=workdir))
        paths = make_dataset(root, size, cores)
        if base is None:
            base = floors(paths, min(size, 200))
        run = {"images": size}
        for stage in ("prepare", "shard"):
            run[stage] = stage_in_subprocess(stage, root)
        run["rank"] = rank_startup(paths.shards)
        runs.append(run)
        print(json.dumps(run), flush=True)
        subprocess.run(["rm", "-rf", str(root)], check=True)
    return {"cores": cores, "floors": base, "runs": runs, "summary": summarize(runs, base, cores)}


def slope(runs: list[dict], value: Callable[[dict], float]) -> float:
    small, large = runs[-2], runs[-1]
    return (value(large) - value(small)) / (large["images"] - small["images"])


def summarize(runs: list[dict], base: dict, cores: int) -> dict:
    if len(runs) < 2:
        return {}
    out: dict = {}
    for stage in ("prepare", "shard"):
        wall = slope(runs, lambda r, s=stage: r[s]["wall_s"])
        cpu = slope(runs, lambda r, s=stage: r[s]["cpu_s"])
        memory = slope(runs, lambda r, s=stage: r[s]["peak_rss_mb"] * 2**20)
        fixed = runs[-1][stage]["peak_rss_mb"] - memory * runs[-1]["images"] / 2**20
        out[stage] = {
            "wall_per_image_s": wall,
            "ratio_to_one_core_floor": wall / base[f"{stage}_floor_s"],
            # CPU seconds per image over the floor: the overhead beyond the image work itself,
            # which a loaded machine does not inflate as it does the wall clock.
            "cpu_per_image_over_floor": cpu / base[f"{stage}_floor_cpu_s"],
            "memory_per_image_bytes": memory,
            "hours_on_16_cores": {
                str(n): wall * n * cores / NODE_CORES / 3600 for n in TARGETS
            },  # every core busy: the wall per image divides by the cores
            "peak_memory_gb": {str(n): (fixed * 2**20 + memory * n) / 2**30 for n in TARGETS},
        }
    last = runs[-1]

    def grown(key: str, n: int) -> float:  # the last size's bytes plus the slope to n, in MB
        per_image = slope(runs, lambda r: r["rank"][key])
        return (last["rank"][key] + per_image * (n - last["images"])) / 2**20

    out["index"] = {
        # Fixed (classes, per-split class counts) plus one entry per 1,000-sample shard.
        "index_json_mb": {
            str(n): (
                last["rank"]["index_bytes"]
                + (n / 1000 - last["rank"]["shards"]) * last["rank"]["entry_bytes"]
            )
            / 2**20
            for n in TARGETS
        },
        "inline_index_json_mb": {str(n): grown("inline_index_bytes", n) for n in TARGETS},
        "offsets_read_per_rank_kb": {
            str(n): 8 * (n / RANKS + 2 * 1000 * LOADER_WORKERS) / 1024 for n in TARGETS
        },
    }
    return out


def metrics_part(args: argparse.Namespace) -> dict:
    report = metrics_report(args.samples, args.classes, args.ranks, args.repeats)
    print("## metrics\n")
    print(report)
    return {"report": report}


PARTS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "data": lambda args: data_part(args.sizes, args.cores, args.workdir),
    "metrics": metrics_part,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["data", "metrics", "all"], default="all")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000], help="data")
    parser.add_argument("--samples", type=int, default=50_000, help="metrics: split size")
    parser.add_argument("--classes", type=int, default=1_000, help="metrics: classes")
    parser.add_argument("--ranks", type=int, default=8, help="metrics: simulated ranks")
    parser.add_argument("--repeats", type=int, default=3, help="metrics: alternating runs")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--run-stage", choices=["prepare", "shard"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_stage:
        print(json.dumps(run_stage(args.run_stage, args.root)))
        return
    parts = list(PARTS) if args.part == "all" else [args.part]
    results = {part: PARTS[part](args) for part in parts}
    if "data" in results:
        print(json.dumps(results["data"]["summary"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
