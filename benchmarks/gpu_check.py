"""Is attnpipe fast and right on this GPU? Six checks in one run; a verdict table on stdout.

    python benchmarks/gpu_check.py --json gpu_check.json      # one GPU, about 5-10 minutes
    python benchmarks/gpu_check.py --smoke --json smoke.json  # tiny, on CPU (run by make test)

Every check runs with the settings the recipes train with (channels_last, cuDNN autotuning,
TF32: `attnpipe.train.loop.speed_settings`), applied before the first timing.

1. Model speed: Attention-56 at 224 x 224, training steps with bf16 autocast against
   torchvision's ResNet-50 (bf16), FLOP-normalised: efficiency = (images/s x MACs) /
   (images/s x MACs of ResNet-50). Target >= 0.85. Attention-56 again in fp32: bf16 / fp32.
   One model at a time on the device, each with its own peak memory (stats reset between).
2. Input path: the training loop on real JPEG shards (256 px shorter side, the loader workers
   given) against the very same training steps on synthetic batches already on the device.
   Target >= 0.9: the GPU must not wait for data.
3. Peak GPU memory of each model's training step (from check 1).
4. Checkpoint: size and save time of the loop's model + optimizer state.
5. Repeatability: two one-epoch runs with `train.deterministic: true`, weights compared.
6. Launcher: a one-GPU epoch under Ray Train against the same epoch under torchrun (steady
   epochs, from the trace events). Target <= 1.05.

The data set is made here: synthetic photographs (smooth colour fields, blobs and noise) as a
`folder` source, taken through the real fetch, prepare and shard stages. `--smoke` shrinks
everything (32 images at 32 px, one timed step per model and no warm-up, one torch thread, one
data process) so that every code path runs on a CPU in about a minute; its numbers are no
measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import bench_models
import bench_train
import numpy as np
import torch
import yaml
from PIL import Image

from attnpipe.config import apply_overrides, load_recipe
from attnpipe.data.prepare import prepare
from attnpipe.data.shard import shard
from attnpipe.data.sources import fetch
from attnpipe.paths import PipelinePaths
from attnpipe.train.build import Run, apply_speed_settings, build, speed_settings
from attnpipe.train.checkpoint import read_checkpoint, write_checkpoint
from attnpipe.train.launch import build_loop_config
from attnpipe.train.loop import run_training
from attnpipe.train.session import TorchrunSession
from attnpipe.train.steps import train_step

PIPELINE = "gpucheck"
TARGETS = {
    "efficiency": (">=", 0.85),
    "real_vs_synthetic": (">=", 0.9),
    "ray_vs_torchrun": ("<=", 1.05),
    "repeatable": ("==", True),
}


@dataclass(frozen=True)
class Sizes:
    model: str
    model_kwargs: dict[str, Any]
    images: int
    photo: tuple[int, int]  # width, height of the generated JPEGs
    input_size: int
    batch: int
    loader_workers: int
    steps: int  # timed steps per model (check 1) and synthetic steps (check 2)
    epochs: int  # of the real-data and launcher runs (>= 3: the first is warm-up)
    cpus_per_worker: int
    warmup: int = 2  # untimed steps before the timed ones: cuDNN autotuning, the allocator
    # torch's intra-op threads for check 1 (0: torch's default, one per core); the training
    # runs take train.cpus_per_worker, which `build` sets.
    threads: int = 0
    data_workers: int = 0  # prepare's and shard's processes (0: one per core)


FULL = Sizes("attention56", {}, 6144, (320, 256), 224, 128, 8, 30, 4, 8)
# The CIFAR layout at a quarter width: the same code paths, seconds on a CPU. No warm-up and
# one timed step: a warm-up step is the timed step again, and one already runs every line a GPU
# run does. One torch thread: two spin-wait on a busy 2-core machine, where ResNet-50's bf16
# steps (no fast bf16 kernels on most CPUs) then take 5-10 times as long. One data process: each
# worker of a pool would import this module (torch: seconds of CPU) to write a few tiny shards.
SMOKE = Sizes(
    "attention56_cifar", {"width_multiplier": 0.25}, 32, (40, 32), 32, 4, 1, 1, 3, 1,
    warmup=0, threads=1, data_workers=1,
)  # fmt: skip


def make_photos(folder: Path, count: int, size: tuple[int, int], classes: int = 4) -> None:
    """Class-per-folder JPEGs that decode like photographs (not flat colour)."""
    rng = np.random.default_rng(0)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for index in range(count):
        label = index % classes
        base = rng.uniform(40, 215, 3)
        field = base + 30 * np.sin(xx[..., None] / rng.uniform(9, 40) + rng.uniform(0, 6))
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(8, height / 2)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
        pixels = field + 60 * blob * (label + 1) + rng.normal(0, 6, (height, width, 3))
        target = folder / f"class{label}" / f"img{index:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(target, quality=90)


def build_project(root: Path, sizes: Sizes) -> PipelinePaths:
    """A project whose one pipeline is the generated photographs, fetched, prepared, sharded."""
    make_photos(root / "photos", sizes.images, sizes.photo)
    recipe = {
        "source": {"kind": "folder", "path": "photos"},
        "prepare": {
            "splits": {"train": 0.9, "val": 0.1, "test": 0.0},
            "seed": 0,
            "workers": sizes.data_workers,
        },
        "shard": {
            "image_size": min(256, sizes.photo[1]),  # shorter side
            "min_shards": max(8, 2 * sizes.loader_workers),
            "workers": sizes.data_workers,
        },
        "model": {
            "name": sizes.model,
            "input_size": sizes.input_size,
            "kwargs": sizes.model_kwargs,
        },
        "train": {
            "workers": 1,
            "epochs": sizes.epochs,
            "batch_size": sizes.batch,
            "loader_workers": sizes.loader_workers,
            "cpus_per_worker": sizes.cpus_per_worker,
            "optimizer": {"name": "sgd", "lr": 0.05},
            "schedule": {"name": "constant"},
            "amp": "auto",  # bf16 on GPUs that have it, full precision on CPUs
            "channels_last": "auto",
        },
        "tracking": {"wandb": {"mode": "disabled"}},
        "evaluate": {"batch_size": 2 * sizes.batch},
    }
    (root / "pipelines").mkdir(parents=True, exist_ok=True)
    (root / "pipelines" / f"{PIPELINE}.yaml").write_text(yaml.safe_dump(recipe))
    paths = PipelinePaths(root, PIPELINE)
    loaded = load_recipe(PIPELINE, root)
    fetch(loaded, paths.raw, progress=False, root=root)
    prepare(loaded, paths, progress=False)
    shard(loaded, paths, progress=False)
    return paths


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_speed(device: torch.device, sizes: Sizes, channels_last: bool) -> dict[str, Any]:
    """Checks 1 and 3: each model alone on the device, speed settings already applied."""
    model, baseline = sizes.model, bench_models.BASELINE
    runs = {
        f"{model} bf16": (model, True),
        f"{model} fp32": (model, False),
        f"{baseline} bf16": (baseline, True),
    }
    timed = {
        label: _time_model(name, amp, device, sizes, channels_last)
        for label, (name, amp) in runs.items()
    }
    speed = {label: t["images_per_s"] for label, t in timed.items()}
    first, baseline_label = f"{model} bf16", f"{baseline} bf16"
    return {
        "models": [model, baseline],
        "images_per_s": speed,
        "gmacs": {label: t["gmacs"] for label, t in timed.items()},
        "efficiency": (speed[first] * timed[first]["gmacs"])
        / (speed[baseline_label] * timed[baseline_label]["gmacs"]),
        "bf16_vs_fp32": speed[first] / speed[f"{model} fp32"],
        "peak_memory_gib": {label: t["peak_memory_gib"] for label, t in timed.items()},
    }


def _time_model(
    name: str, amp: bool, device: torch.device, sizes: Sizes, channels_last: bool
) -> dict[str, Any]:
    """Training steps of one model; its own peak memory; freed before the next model."""
    on_gpu = device.type == "cuda"
    args = argparse.Namespace(
        num_classes=1000, batch_size=sizes.batch, channels_last=channels_last, amp=amp
    )
    runner = bench_models.Runner(name, sizes.input_size, args, device)
    for _ in range(sizes.warmup):
        runner.step()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    times = [runner.step() for _ in range(sizes.steps)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None
    gmacs = runner.gmacs
    del runner  # not two models resident: the next one's peak is its own
    if on_gpu:
        torch.cuda.empty_cache()
    return {
        "images_per_s": sizes.batch / statistics.median(times),
        "gmacs": gmacs,
        "peak_memory_gib": peak,
    }


def input_path(paths: PipelinePaths, sizes: Sizes) -> tuple[dict[str, Any], Run]:
    """Check 2: the loop on real shards against the loop's own step on synthetic batches.
    Also returns the synthetic run (trained a few steps) for the checkpoint check."""
    recipe = load_recipe(PIPELINE, paths.root)
    config = build_loop_config(recipe, paths)
    storage = paths.root / "real-run"
    run_training(config, TorchrunSession(storage, use_gpu=recipe.train.use_gpu))
    last = sorted(storage.glob("checkpoint_*"))[-1]
    history = read_checkpoint(last)["state"]["history"]
    real = statistics.median(row["train_images_per_s"] for row in history[1:])

    session = TorchrunSession(paths.root / "synthetic-run", use_gpu=recipe.train.use_gpu)
    run = build(config, session)
    shape = (sizes.batch, 3, sizes.input_size, sizes.input_size)
    images = torch.randn(shape, device=session.device).contiguous(memory_format=run.memory_format)
    labels = torch.randint(0, len(run.classes), (sizes.batch,), device=session.device)
    run.model.train()
    for step in range(sizes.warmup):
        train_step(run, step % run.steps, images, labels)
    sync(session.device)
    started = time.perf_counter()
    for step in range(sizes.steps):
        train_step(run, step % run.steps, images, labels)
    sync(session.device)
    synthetic = sizes.steps * sizes.batch / (time.perf_counter() - started)
    result = {
        "real_images_per_s": real,
        "synthetic_images_per_s": synthetic,
        "real_vs_synthetic": real / synthetic,
        "loader_workers": sizes.loader_workers,
        "device": str(session.device),
    }
    return result, run


def checkpoint_cost(run: Run) -> dict[str, Any]:
    """Check 4: what every epoch's checkpoint costs (model + optimizer, from the device)."""
    with tempfile.TemporaryDirectory() as folder:
        sync(run.device)
        started = time.perf_counter()
        path = write_checkpoint(
            Path(folder),
            {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict()},
        )
        seconds = time.perf_counter() - started
        return {"checkpoint_mib": path.stat().st_size / 2**20, "checkpoint_save_s": seconds}


def repeatability(paths: PipelinePaths) -> dict[str, Any]:
    """Check 5: two one-epoch runs with train.deterministic give the same weights."""
    recipe = load_recipe(PIPELINE, paths.root)
    recipe = apply_overrides(
        recipe, {"train.deterministic": True, "train.epochs": 1}, origin="gpu_check"
    )
    config = build_loop_config(recipe, paths)
    weights = []
    for attempt in ("a", "b"):
        storage = paths.root / f"repeat-{attempt}"
        run_training(config, TorchrunSession(storage, use_gpu=recipe.train.use_gpu))
        weights.append(read_checkpoint(sorted(storage.glob("checkpoint_*"))[-1])["model"])
    torch.use_deterministic_algorithms(False)  # the launcher check trains as recipes do
    differing = [k for k, v in weights[0].items() if not torch.equal(v, weights[1][k])]
    return {"repeatable": not differing, "differing_tensors": len(differing)}


def launcher(paths: PipelinePaths) -> dict[str, Any]:
    """Check 4: steady-state epoch seconds under Ray Train and under torchrun, one worker."""
    epoch_s = {}
    for kind in ("ray", "torchrun"):
        trace = Path(tempfile.mkdtemp(prefix=f"gpucheck-{kind}-"))
        command, env = bench_train.training_command(kind, paths.root, 1, trace, pipeline=PIPELINE)
        done = subprocess.run(
            command, env={**os.environ, **env}, capture_output=True, text=True, check=False
        )
        if done.returncode:
            sys.exit(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
        epoch_s[kind] = bench_train.epoch_phases(bench_train.rank0_events(trace))["epoch_s"]
    return {
        "ray_epoch_s": epoch_s["ray"],
        "torchrun_epoch_s": epoch_s["torchrun"],
        "ray_vs_torchrun": epoch_s["ray"] / epoch_s["torchrun"],
    }


def verdict(name: str, value: Any, smoke: bool) -> str:
    sign, bound = TARGETS[name]
    met = {">=": value >= bound, "<=": value <= bound, "==": value == bound}[sign]
    if smoke:
        return f"target {sign} {bound} (smoke run: not a measurement)"
    return f"target {sign} {bound}: {'met' if met else 'NOT met'}"


def table(results: dict[str, Any], smoke: bool) -> str:
    speed, data, runs = results["model_speed"], results["input_path"], results["launcher"]
    saved, repeat = results["checkpoint"], results["repeatability"]
    rows = [
        (f"{label} images/s", f"{value:.1f}", "") for label, value in speed["images_per_s"].items()
    ]
    rows += [
        ("FLOP-normalised efficiency", f"{speed['efficiency']:.3f}",
         verdict("efficiency", speed["efficiency"], smoke)),
        ("bf16 / fp32 (attention)", f"{speed['bf16_vs_fp32']:.2f}", ""),
        ("real shards images/s", f"{data['real_images_per_s']:.1f}", ""),
        ("synthetic batches images/s", f"{data['synthetic_images_per_s']:.1f}", ""),
        ("real / synthetic", f"{data['real_vs_synthetic']:.3f}",
         verdict("real_vs_synthetic", data["real_vs_synthetic"], smoke)),
    ]  # fmt: skip
    rows += [
        (f"peak GPU memory {label} (GiB)", "n/a (CPU)" if peak is None else f"{peak:.2f}", "")
        for label, peak in speed["peak_memory_gib"].items()
    ]
    rows += [
        ("checkpoint size (MiB)", f"{saved['checkpoint_mib']:.1f}", ""),
        ("checkpoint save (s)", f"{saved['checkpoint_save_s']:.2f}", ""),
        ("train.deterministic repeats", "yes" if repeat["repeatable"] else
         f"no ({repeat['differing_tensors']} tensors differ)",
         verdict("repeatable", repeat["repeatable"], smoke)),
        ("Ray Train epoch (s)", f"{runs['ray_epoch_s']:.2f}", ""),
        ("torchrun epoch (s)", f"{runs['torchrun_epoch_s']:.2f}", ""),
        ("Ray / torchrun", f"{runs['ray_vs_torchrun']:.3f}",
         verdict("ray_vs_torchrun", runs["ray_vs_torchrun"], smoke)),
    ]  # fmt: skip
    lines = [f"device: {results['device']}", "", "| check | value | verdict |", "|---|---:|---|"]
    lines += [f"| {name} | {value} | {note} |" for name, value, note in rows]
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device (tests)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("no GPU here: run with --smoke for the tiny CPU version")
    sizes = SMOKE if args.smoke else FULL
    if sizes.threads:
        torch.set_num_threads(sizes.threads)
    root = Path(tempfile.mkdtemp(prefix="gpucheck-"))
    try:
        paths = build_project(root, sizes)
        # The recipes' speed settings, before anything is timed.
        speed = speed_settings(load_recipe(PIPELINE, root).train, device)
        apply_speed_settings(speed)
        channels_last = speed.memory_format == torch.channels_last
        # Models first, each alone on the device: nothing else is resident yet.
        models = model_speed(device, sizes, channels_last)
        data, synthetic_run = input_path(paths, sizes)
        saved = checkpoint_cost(synthetic_run)
        del synthetic_run
        results = {
            "device": device_name(device),
            "smoke": args.smoke,
            "sizes": asdict(sizes),
            "model_speed": models,
            "input_path": data,
            "checkpoint": saved,
            "repeatability": repeatability(paths),
            "launcher": launcher(paths),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(table(results, args.smoke))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=_plain) + "\n")
    return results


def _plain(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else str(value)


if __name__ == "__main__":
    main()
