"""Mid-epoch checkpoint benchmark: what `train.checkpoint_every` costs a training epoch.

    uv run python benchmarks/bench_checkpoint_every.py --epochs 4 --rounds 2
    uv run python benchmarks/bench_checkpoint_every.py --every 1,5,50 --workers 2

Builds the digits shards in a temporary project, then trains the same run (the digits recipe,
`train.deterministic`, W&B off) under `torchrun -m attnpipe.train.torchrun` (the loop without
Ray: mid-epoch checkpoints never go through Ray, so it sees the whole cost) once without
mid-epoch checkpoints and once per `--every` value, in rounds of A-B-C-D-D-C-B-A (a steady
drift of the machine's speed cancels). Each run's history gives the training seconds of every
epoch (`epoch_seconds`: the steps only, which is where a mid-epoch checkpoint's cost lands;
validation and the epoch's own checkpoint are outside it); the first epoch is warm-up. Printed:
the median steady-state epoch per setting, its ratio to no mid-epoch checkpoints (median of
the rounds' ratios), the checkpoints written per epoch and the size of one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from attnpipe.train.checkpoint_folders import CheckpointFolders

REPO = Path(__file__).resolve().parents[1]


def build_project(root: Path) -> None:
    for item in ("pipelines", "params.yaml", "dvc.yaml"):
        source = REPO / item
        (shutil.copytree if source.is_dir() else shutil.copy)(source, root / item)
    recipe_path = root / "pipelines" / "digits.yaml"
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["tracking"] = {"wandb": {"mode": "disabled"}}
    recipe_path.write_text(yaml.safe_dump(recipe))
    for stage in ("fetch", "prepare", "shard"):
        command = [sys.executable, "-m", "attnpipe.cli", "--root", str(root), stage, "digits"]
        subprocess.run([*command, "--no-progress"], check=True, capture_output=True)


def train_once(root: Path, every: int | None, epochs: int, workers: int) -> dict[str, float]:
    """One run; its steady-state epoch seconds and what its mid-epoch checkpoints weighed."""
    storage = Path(tempfile.mkdtemp(prefix="bench-checkpoint-every-"))
    settings = {
        "train.epochs": epochs,
        "train.workers": workers,
        "train.deterministic": "true",
        "train.checkpoint_every": "null" if every is None else str(every),
        "train.checkpoints_to_keep": 1,
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(workers),
        "-m", "attnpipe.train.torchrun", "digits", "--root", str(root),
        "--storage", str(storage),
    ]  # fmt: skip
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    latest = CheckpointFolders(storage, 1).latest()
    if latest is None:
        sys.exit(f"no checkpoint in {storage}")
    saved = torch.load(latest / "checkpoint.pt", map_location="cpu", weights_only=True)
    seconds = [row["epoch_seconds"] for row in saved["state"]["history"]][1:]
    steps = saved["schedule_step"] // epochs
    # Every `every` optimizer steps of the run, except at an epoch's last step (its end saves).
    written = (
        0
        if every is None
        else sum(1 for g in range(1, steps * epochs + 1) if g % every == 0 and g % steps)
    )
    result = {
        "epoch_s": statistics.median(seconds),
        "checkpoints_per_epoch": written / epochs,
        "checkpoint_mb": (latest / "checkpoint.pt").stat().st_size / 2**20,
    }
    shutil.rmtree(storage, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4, help="per run; the first is warm-up")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="ranks (torchrun processes)")
    parser.add_argument("--every", default="1,5,50", help="checkpoint_every values to compare")
    args = parser.parse_args()
    settings: list[int | None] = [None, *(int(v) for v in args.every.split(","))]
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-every-") as folder:
        root = Path(folder)
        build_project(root)
        runs: dict[int | None, list[dict[str, float]]] = {s: [] for s in settings}
        for _ in range(args.rounds):
            for every in [*settings, *reversed(settings)]:
                runs[every].append(train_once(root, every, args.epochs, args.workers))
                print(f"checkpoint_every={every}: {runs[every][-1]}", file=sys.stderr)
    report = {}
    for every in settings:
        # Each round ran every setting twice (A-B-C-D-D-C-B-A): its ratio uses both of each.
        ratios = []
        for r in range(args.rounds):
            pair = runs[every][2 * r : 2 * r + 2]
            base = runs[None][2 * r : 2 * r + 2]
            ratios.append(sum(p["epoch_s"] for p in pair) / sum(b["epoch_s"] for b in base))
        report[str(every)] = {
            "epoch_s": statistics.median(run["epoch_s"] for run in runs[every]),
            "ratio_to_none": statistics.median(ratios),
            "checkpoints_per_epoch": runs[every][0]["checkpoints_per_epoch"],
            "checkpoint_mb": round(runs[every][0]["checkpoint_mb"], 2),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
