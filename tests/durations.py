"""Time per test file and per shared fixture, from pytest's `--durations=0` report.

    make test PYTEST_ADDOPTS="--durations=0" > test.log 2>&1
    uv run python -m tests.durations test.log

A session fixture's time counts in the setup of the first test that asks for it.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

LINE = re.compile(r"^([\d.]+)s (setup|call|teardown)\s+(\S+?)::(\S+)")


def per_file(report: str) -> Counter:
    """Seconds per test file: setup, call and teardown of each of its tests."""
    seconds: Counter = Counter()
    for line in report.splitlines():
        match = LINE.match(line)
        if match:
            seconds[match.group(3)] += float(match.group(1))
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path, help="the output of a run with --durations=0")
    parser.add_argument("--top", type=int, default=30, help="files to list (default 30)")
    args = parser.parse_args(argv)
    seconds = per_file(args.log.read_text(errors="replace"))
    print(f"{sum(seconds.values()):7.0f} s in {len(seconds)} files")
    for name, total in seconds.most_common(args.top):
        print(f"{total:7.1f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
