"""Training benchmark: the same loop, data and worker count under Ray Train and plain torchrun.

    uv run python benchmarks/bench_train.py --epochs 6 --workers 2 --rounds 3
    uv run python benchmarks/bench_train.py --paired --epochs 6 --rounds 2

Builds the digits shards in a temporary project, then launches `attnpipe train` (Ray
TorchTrainer, a fresh local cluster) and `torchrun -m attnpipe.train.torchrun` (no Ray) as
subprocesses, in rounds of A-B-B-A. Each rank's trace events (ATTNPIPE_TRACE_DIR) give:
- start-up: seconds from launching the command to rank 0 starting epoch 1;
- steady-state epoch time: median time between consecutive epoch starts after the first
  (training, validation, checkpoint and report included), and its phases;
- CPU seconds per steady-state epoch (Linux /proc): of the training ranks, and of every other
  process on the machine (Ray's daemons and helper actors; torchrun's agent).
The ratio Ray / torchrun of the steady-state epoch time is the overhead of Ray Train; each
round gives one ratio (A-B-B-A cancels a steady drift of the machine's speed), the median of
the rounds is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

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
        command = [sys.executable, "-m", "attnpipe.cli", "--root", str(root), stage, "digits"]
        subprocess.run([*command, "--no-progress"], check=True, capture_output=True)


class Launched:
    """A benchmark subprocess, optionally pinned to one CPU, its output read by a thread (so
    that a chatty run never blocks on a full pipe)."""

    def __init__(self, command: list[str], env: dict[str, str], cpu: int | None = None) -> None:
        self.command = command
        self.launched = time.time()
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # Ray's daemons and actors are children of the driver: they inherit the pinning.
            preexec_fn=None if cpu is None else lambda: os.sched_setaffinity(0, {cpu}),
        )
        self.output: list[str] = []
        self.reader = threading.Thread(
            target=lambda: self.output.extend(self.process.stdout or []), daemon=True
        )
        self.reader.start()

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self) -> None:
        self.process.wait()
        self.reader.join()
        if self.process.returncode:
            sys.exit(f"{' '.join(self.command)} failed:\n{''.join(self.output)[-3000:]}")


def launch(command: list[str], env: dict[str, str], trace: Path, epochs: int) -> dict[str, Any]:
    """Run `command`; CPU seconds of all processes at the 2nd and at the last epoch start."""
    run = Launched(command, env)
    snapshots: list[dict[int, float]] = []
    snapshot_at = [2, epochs]  # epoch starts: the steady state is between them
    while run.running():
        if len(snapshots) < 2 and _count_epochs(trace) >= snapshot_at[len(snapshots)]:
            snapshots.append(cpu_seconds_by_process())
        time.sleep(0.1)
    run.wait()
    return {"launched": run.launched, "snapshots": snapshots}


def _count_epochs(trace: Path) -> int:
    log = trace / "rank0.jsonl"
    return log.read_text().count('"event": "epoch"') if log.exists() else 0


def cpu_seconds_by_process() -> dict[int, float]:
    """User + system CPU seconds of every process now (Linux /proc; empty elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    seconds = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    return seconds


def training_command(
    kind: str,
    root: Path,
    workers: int,
    trace: Path,
    extra_epochs: int = 0,
    pipeline: str = "digits",
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of one training run, writing trace events to `trace`."""
    env = {"ATTNPIPE_TRACE_DIR": str(trace), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    if kind == "ray":
        shutil.rmtree(root / "models", ignore_errors=True)
        return [sys.executable, "-m", "attnpipe.cli", "--root", str(root), "train", pipeline], env
    storage = Path(tempfile.mkdtemp(prefix="torchrun-"))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(workers),
        "-m", "attnpipe.train.torchrun", pipeline, "--root", str(root),
        "--storage", str(storage),
    ]  # fmt: skip
    if extra_epochs:
        recipe = yaml.safe_load((root / "pipelines" / f"{pipeline}.yaml").read_text())
        command += ["--set", f"train.epochs={recipe['train']['epochs'] + extra_epochs}"]
    return command, env


def measure(kind: str, root: Path, workers: int, epochs: int) -> dict[str, float]:
    trace = Path(tempfile.mkdtemp(prefix=f"trace-{kind}-"))
    command, env = training_command(kind, root, workers, trace)
    run = launch(command, env, trace, epochs)
    events = rank0_events(trace)
    result = {"startup_s": _first("epoch", events) - run["launched"], **epoch_phases(events)}
    if len(run["snapshots"]) == 2:
        result |= steady_cpu(run["snapshots"], trace, steady_epochs=epochs - 2)
    return result


def steady_cpu(
    snapshots: list[dict[int, float]], trace: Path, steady_epochs: int
) -> dict[str, float]:
    """CPU per steady-state epoch: of the training ranks, and of every other process."""
    before, after = snapshots
    ranks = {json.loads(x)["pid"] for log in trace.glob("rank*.jsonl") for x in log.open()}
    used = {pid: after[pid] - before.get(pid, 0.0) for pid in after}
    rank_cpu = sum(v for pid, v in used.items() if pid in ranks)
    return {
        "rank_cpu_s": rank_cpu / steady_epochs,
        "other_cpu_s": (sum(used.values()) - rank_cpu) / steady_epochs,
    }


def rank0_events(trace: Path) -> list[dict]:
    return [json.loads(line) for line in (trace / "rank0.jsonl").read_text().splitlines()]


def _first(name: str, events: list[dict]) -> float:
    return next(e["time"] for e in events if e["event"] == name)


def steady_epochs(events: list[dict]) -> list[tuple[float, float, float, float]]:
    """(start, validate mark, checkpoint mark, end) of every epoch after the first (warm-up);
    an epoch ends where the next starts, so the last one, with no successor, is left out too.
    """
    starts, validates, checkpoints = (
        [e["time"] for e in events if e["event"] == name]
        for name in ("epoch", "validate", "checkpoint")
    )
    return [
        (starts[i], validates[i], checkpoints[i], starts[i + 1]) for i in range(1, len(starts) - 1)
    ]


def epoch_phases(events: list[dict]) -> dict[str, float]:
    """Median seconds of a steady-state epoch and of its phases."""
    epochs = steady_epochs(events)
    phases = {
        "epoch_s": [end - start for start, _, _, end in epochs],
        "train_s": [validate - start for start, validate, _, _ in epochs],
        "validate_s": [checkpoint - validate for _, validate, checkpoint, _ in epochs],
        "checkpoint_report_s": [end - checkpoint for _, _, checkpoint, end in epochs],
    }
    return {key: statistics.median(values) for key, values in phases.items()}


def measure_paired(root: Path, ray_cpu: int, torchrun_cpu: int) -> dict[str, float]:
    """Ray Train and torchrun, one worker each, at the same time, each pinned to its own CPU.

    Whatever slows the machine down meanwhile slows both: the ratio of their epoch times is
    free of the drift that sequential runs suffer. Ray's daemons share the Ray worker's CPU
    (as they share the cores of a machine the ranks fill). torchrun starts once Ray's first
    epoch has begun and trains two epochs more, so that its epochs span Ray's; the epochs of
    each that lie wholly in the time both were past their first epoch are compared.
    """
    traces = {kind: Path(tempfile.mkdtemp(prefix=f"trace-paired-{kind}-")) for kind in PAIR}
    ray = Launched(*training_command("ray", root, 1, traces["ray"]), cpu=ray_cpu)
    while _count_epochs(traces["ray"]) < 1 and ray.running():
        time.sleep(0.1)
    torchrun_command, env = training_command("torchrun", root, 1, traces["torchrun"], 2)
    torchrun = Launched(torchrun_command, env, cpu=torchrun_cpu)
    ray.wait()
    torchrun.wait()
    epochs = {
        kind: [(start, end) for start, *_, end in steady_epochs(rank0_events(traces[kind]))]
        for kind in PAIR
    }
    window_start = max(spans[0][0] for spans in epochs.values())
    window_end = min(spans[-1][1] for spans in epochs.values())
    result = {}
    for kind, spans in epochs.items():
        inside = [
            end - start for start, end in spans if window_start <= start and end <= window_end
        ]
        if len(inside) < 2:
            sys.exit(f"only {len(inside)} {kind} epochs overlapped: use more --epochs")
        result[f"{kind}_epoch_s"] = statistics.median(inside)
        result[f"{kind}_epochs"] = len(inside)
    result["ratio"] = result["ray_epoch_s"] / result["torchrun_epoch_s"]
    return result


PAIR = ("ray", "torchrun")


COLUMNS = {
    "startup_s": "start-up (s)",
    "epoch_s": "steady-state epoch (s)",
    "train_s": "train (s)",
    "validate_s": "validate (s)",
    "checkpoint_report_s": "checkpoint + report (s)",
    "rank_cpu_s": "ranks' CPU per epoch (s)",
    "other_cpu_s": "other processes' CPU per epoch (s)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6, help="per run (at least 4)")
    parser.add_argument(
        "--workers", type=int, default=2, help="ranks per run (sequential rounds only)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds of Ray, torchrun, torchrun, Ray (with --paired: of both at once)",
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="one worker each, Ray and torchrun at the same time on their own CPUs, swapping"
        " CPUs every round",
    )
    args = parser.parse_args()
    if args.epochs < 4:
        parser.error("--epochs must be at least 4: the first epoch is warm-up")
    if args.paired:
        paired(args.epochs, args.rounds)
    else:
        sequential(args.epochs, args.workers, args.rounds)


def sequential(epochs: int, workers: int, rounds: int) -> None:
    results: dict[str, list[dict[str, float]]] = {"ray": [], "torchrun": []}
    ratios = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        build_project(root, epochs, workers)
        for round_number in range(1, rounds + 1):
            for kind in ("ray", "torchrun", "torchrun", "ray"):
                results[kind].append(measure(kind, root, workers, epochs))
                shown = ", ".join(f"{k} {v:.2f}" for k, v in results[kind][-1].items())
                print(f"round {round_number} {kind}: {shown}", flush=True)
            # A-B-B-A: a drift of the machine's speed during the round cancels out.
            ray_s, torchrun_s = (
                statistics.mean(r["epoch_s"] for r in results[kind][-2:])
                for kind in ("ray", "torchrun")
            )
            ratios.append(ray_s / torchrun_s)
    print(f"\n| launcher | {' | '.join(COLUMNS.values())} |\n|---|{'---|' * len(COLUMNS)}")
    for kind, runs in results.items():
        cells = [
            f"{statistics.median(r[key] for r in runs):.2f}" if key in runs[0] else "n/a"
            for key in COLUMNS
        ]
        print(f"| {kind} | {' | '.join(cells)} |")
    print(ratio_line("", ratios))


def paired(epochs: int, rounds: int) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("--paired needs two CPUs")
    first, second = sorted(os.sched_getaffinity(0))[:2]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        build_project(root, epochs, workers=1)
        for round_number in range(1, rounds + 1):
            cpus = (first, second) if round_number % 2 else (second, first)
            results.append(measure_paired(root, *cpus))
            shown = ", ".join(f"{k} {v:.3f}" for k, v in results[-1].items())
            print(f"round {round_number} (Ray on CPU {cpus[0]}): {shown}", flush=True)
    print(ratio_line(", paired", [r["ratio"] for r in results]))


def ratio_line(kind: str, ratios: list[float]) -> str:
    each = ", ".join(f"{r:.3f}" for r in ratios)
    return (
        f"\nepoch time ratio Ray Train / torchrun{kind}: {statistics.median(ratios):.3f} median"
        f" of {len(ratios)} rounds (each round {each}); target <= 1.05"
    )


if __name__ == "__main__":
    main()
