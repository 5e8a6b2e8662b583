"""Training throughput of the registry models against torchvision's ResNet-50, in one run.

For every model: images/s of full training steps (forward + backward + SGD step) after warmup,
its multiply-adds per image, and the FLOP-normalised efficiency
``(images/s x MACs) / (images/s x MACs of torchvision resnet50)``: 1.0 means the model turns
compute into throughput as well as ResNet-50 does.

Example (2-core CPU, a few minutes):
    python benchmarks/bench_models.py --device cpu --batch-size 8 --image-size 112 --steps 6
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from attnpipe.models import count_macs, create_model, default_input_size, list_models

BASELINE = "torchvision_resnet50"


@dataclass
class Result:
    model: str
    image_size: int
    images_per_s: float
    step_ms: float
    gmacs: float
    efficiency: float = float("nan")  # filled in once the baseline is known


def build(name: str, num_classes: int) -> nn.Module:
    if name == BASELINE:
        return torchvision.models.resnet50(num_classes=num_classes)
    return create_model(name, num_classes)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One model with its optimizer and a fixed batch, ready to run training steps."""

    def __init__(
        self, name: str, image_size: int, args: argparse.Namespace, device: torch.device
    ) -> None:
        torch.manual_seed(0)
        self.name, self.image_size, self.device = name, image_size, device
        model = build(name, args.num_classes)
        self.gmacs = count_macs(model, image_size) / 1e9
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = model.to(device=device, memory_format=fmt).train()
        self.opt = torch.optim.SGD(
            self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4
        )
        self.x = torch.randn(args.batch_size, 3, image_size, image_size, device=device)
        self.x = self.x.contiguous(memory_format=fmt)
        self.y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
        self.amp = args.amp
        self.times: list[float] = []

    def step(self) -> float:
        """One forward + backward + SGD step; returns its wall time in seconds."""
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.amp
            else contextlib.nullcontext()
        ):
            loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        sync(self.device)
        return time.perf_counter() - start


def markdown(results: list[Result]) -> str:
    lines = [
        "| model | input | images/s | ms/step | GMACs/image | FLOP-normalised efficiency |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.model} | {r.image_size} | {r.images_per_s:.2f} | {r.step_ms:.0f} "
            f"| {r.gmacs:.3f} | {r.efficiency:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--image-size",
        type=int,
        default=112,
        help="input side for ImageNet layouts; CIFAR layouts always run at their native 32",
    )
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--models",
        default=",".join(list_models()),
        help=f"comma-separated registry names ({BASELINE} is always added)",
    )
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write results to this JSON file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [BASELINE] + [n for n in args.models.split(",") if n and n != BASELINE]
    runners = []
    for name in names:
        native = 224 if name == BASELINE else default_input_size(name)
        runners.append(Runner(name, args.image_size if native >= 64 else native, args, device))
    for r in runners:
        for _ in range(args.warmup):
            r.step()
    # Round-robin timing: one step of every model per round, so load from other processes
    # on a shared machine hits all models alike instead of whichever runs at that moment.
    for i in range(args.steps):
        for r in runners:
            r.times.append(r.step())
        print(f"round {i + 1}/{args.steps} done", flush=True)
    results = []
    for r in runners:
        step_s = statistics.median(r.times)  # median: robust to a noisy step
        results.append(
            Result(r.name, r.image_size, args.batch_size / step_s, step_s * 1e3, r.gmacs)
        )
    base = results[0]
    for r in results:
        r.efficiency = (r.images_per_s * r.gmacs) / (base.images_per_s * base.gmacs)

    print()
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"cpu={platform.processor() or platform.machine()} batch={args.batch_size} "
        f"channels_last={args.channels_last} amp={args.amp}"
    )
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": [asdict(r) for r in results]}, f, indent=2)


if __name__ == "__main__":
    main()
