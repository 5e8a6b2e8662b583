"""The per-core loader figure of two source trees, paired: the same work, rounds alternating.

    git archive <base commit> | tar -x -C /tmp/attnpipe-base
    uv run python benchmarks/compare_loader.py --base /tmp/attnpipe-base/src --rounds 8

Measures what `bench_data.py` calls "ours: shards, 0 workers": images per CPU-second of
`make_loader(stream, 64, workers=0)` over a training `ShardStream` (RandomResizedCrop 224 +
flip + normalise, one process, one torch thread) on bench_data's synthetic 800x600 photos,
sharded at 256 by each tree's own `shard()`. Each round runs both trees once, in fresh
processes, with the same torch seed (a new one per round), the order swapped every round.

Why seeds: the crops drawn decide how much resizing an image costs, and a loader that draws
from torch's generator at other moments (a DataLoader iterator per epoch draws a seed) gets
other crops. With one fixed seed that difference repeats in every round and reads as a few
percent of speed; over several seeds it averages out. Paired rounds keep the shared machine's
drift out of the ratio.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEAD_SRC = HERE.parent / "src"


def child(root: Path, images: int, batches: int, seed: int) -> None:
    """Runs under one tree's `attnpipe`: shard once, then time the loader; prints JSON."""
    import torch

    torch.set_num_threads(1)
    import bench_data

    from attnpipe.data.loaders import ShardStream, build_transform, make_loader, split_info
    from attnpipe.data.prepare import prepare
    from attnpipe.data.shard import shard

    recipe, paths = bench_data.make_project(root, images, cores=1)
    if not (paths.shards / "index.json").exists():
        prepare(recipe, paths, progress=False)
        shard(recipe, paths, progress=False)
    torch.manual_seed(seed)
    stream = ShardStream(
        urls=split_info(paths.shards, "train").urls,
        rank=0,
        world_size=1,
        transform=build_transform(bench_data.AUGMENT, bench_data.INPUT, train=True),
        train=True,
        shuffle_buffer=256,
    )
    loader = make_loader(stream, bench_data.BATCH, 0)

    def every_epoch():  # a stream that ends with its epoch, or one that never ends: both work
        for epoch in itertools.count():
            stream.set_epoch(epoch)
            yield from loader

    measure = bench_data.timed(
        "loader", batches * bench_data.BATCH, 1, *bench_data.drain(every_epoch(), batches, 2)
    )
    print(json.dumps({"images_per_cpu_s": measure.per_cpu_s, "images_per_s": measure.per_s}))


def run_side(src: Path, root: Path, args: argparse.Namespace, seed: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(HERE)])}
    command = [sys.executable, __file__, "--child", str(root), "--seed", str(seed)]
    command += ["--images", str(args.images), "--batches", str(args.batches)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{src}: the measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="the src/ folder to compare to (required)")
    parser.add_argument("--head", type=Path, default=HEAD_SRC, help="default: this tree's src/")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--batches", type=int, default=25, help="timed batches of 64 per run")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.images, args.batches, args.seed)
        return
    if args.base is None:
        parser.error("--base is required: the src/ folder of the tree to compare against")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="compare_loader_"))
    sides = {"base": args.base.resolve(), "head": args.head.resolve()}
    figures: dict[str, list[float]] = {name: [] for name in sides}
    for round_number in range(args.rounds):
        order = list(sides) if round_number % 2 == 0 else list(reversed(sides))
        row = {}
        for name in order:
            row[name] = run_side(sides[name], work / name, args, seed=round_number + 1)
            figures[name].append(row[name]["images_per_cpu_s"])
        ratio = row["head"]["images_per_cpu_s"] / row["base"]["images_per_cpu_s"]
        print(
            f"round {round_number + 1} (seed {round_number + 1}): images per CPU-second  "
            f"base {row['base']['images_per_cpu_s']:7.1f}  head "
            f"{row['head']['images_per_cpu_s']:7.1f}  head/base {ratio:.3f}  "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    ratios = [h / b for h, b in zip(figures["head"], figures["base"], strict=True)]
    summary = {
        "command": " ".join(["python", *sys.argv]),
        "median_images_per_cpu_s": {k: statistics.median(v) for k, v in figures.items()},
        "median_ratio_head_over_base": statistics.median(ratios),
        "mean_ratio_head_over_base": statistics.fmean(ratios),
    }
    print(json.dumps(summary, indent=2))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
