"""Training benchmark: the same loop, data and worker count under Ray Train and plain torchrun.

    uv run python benchmarks/bench_train.py --epochs 6 --workers 2

Builds the digits shards in a temporary project, then launches `attnpipe train` (Ray
TorchTrainer, a fresh local cluster) and `torchrun -m attnpipe.train.torchrun` (no Ray) as
subprocesses, alternating A-B-B-A. Each rank's trace events (ATTNPIPE_TRACE_DIR) give:
- start-up: seconds from launching the command to rank 0 starting epoch 1;
- steady-state epoch time: median time between consecutive epoch starts after the first
  (training, validation, checkpoint and report included).
The ratio Ray / torchrun of the steady-state epoch time is the overhead of Ray Train.
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
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def build_project(root: Path, epochs: int, workers: int) -> None:
    for item in ("pipelines", "params.yaml", "dvc.yaml"):
        source = REPO / item
        (shutil.copytree if source.is_dir() else shutil.copy)(source, root / item)
    recipe_path = root / "pipelines" / "digits.yaml"
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["train"].update(epochs=epochs, workers=workers)
    recipe["tracking"] = {"wandb": {"mode": "disabled"}}
    recipe_path.write_text(yaml.safe_dump(recipe))
    for stage in ("fetch", "prepare", "shard"):
        run(
            [
                sys.executable,
                "-m",
                "attnpipe.cli",
                "--root",
                str(root),
                stage,
                "digits",
                "--no-progress",
            ],
            {},
        )


def run(command: list[str], env: dict[str, str]) -> float:
    started = time.time()
    done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return started


def measure(kind: str, root: Path, workers: int) -> dict[str, float]:
    trace = Path(tempfile.mkdtemp(prefix=f"trace-{kind}-"))
    env = {"ATTNPIPE_TRACE_DIR": str(trace), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    if kind == "ray":
        shutil.rmtree(root / "models", ignore_errors=True)
        command = [sys.executable, "-m", "attnpipe.cli", "--root", str(root), "train", "digits"]
    else:
        storage = Path(tempfile.mkdtemp(prefix="torchrun-"))
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(workers),
            "-m", "attnpipe.train.torchrun", "digits", "--root", str(root),
            "--storage", str(storage),
        ]  # fmt: skip
    launched = run(command, env)
    events = [json.loads(x) for x in (trace / "rank0.jsonl").read_text().splitlines()]
    starts = [e["time"] for e in events if e["event"] == "epoch"]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    return {"startup_s": starts[0] - launched, "epoch_s": statistics.median(gaps[1:] or gaps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        build_project(root, args.epochs, args.workers)
        results: dict[str, list[dict[str, float]]] = {"ray": [], "torchrun": []}
        for kind in ("ray", "torchrun", "torchrun", "ray"):
            results[kind].append(measure(kind, root, args.workers))
            print(kind, results[kind][-1], flush=True)
    summary = {
        kind: {key: statistics.mean(r[key] for r in runs) for key in ("startup_s", "epoch_s")}
        for kind, runs in results.items()
    }
    ratio = summary["ray"]["epoch_s"] / summary["torchrun"]["epoch_s"]
    print("\n| launcher | start-up (s) | steady-state epoch (s) |\n|---|---|---|")
    for kind, values in summary.items():
        print(f"| {kind} | {values['startup_s']:.1f} | {values['epoch_s']:.2f} |")
    print(f"\nepoch time ratio Ray Train / torchrun: {ratio:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
