"""Scale benchmarks for ImageNet-sized work (issue 20), in parts:

    uv run python benchmarks/bench_scale.py --part metrics     # validation/evaluation metrics
    uv run python benchmarks/bench_scale.py --part metrics --samples 5000 --classes 100  # quick

metrics: validation and evaluation metrics at 50,000 x 1,000 over 8 simulated ranks, per-rank
time and memory, against the old gather-everything way as the baseline in the same run
(benchmarks/scale_metrics.py). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_metrics import metrics_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["metrics", "all"], default="all")
    parser.add_argument("--samples", type=int, default=50_000, help="metrics: split size")
    parser.add_argument("--classes", type=int, default=1_000, help="metrics: classes")
    parser.add_argument("--ranks", type=int, default=8, help="metrics: simulated ranks")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs, median")
    args = parser.parse_args()
    if args.part in ("metrics", "all"):
        print("## metrics\n")
        print(metrics_report(args.samples, args.classes, args.ranks, args.repeats))


if __name__ == "__main__":
    main()
