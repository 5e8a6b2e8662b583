"""Process start-up: what a fresh Python process pays to import our stages, with and without .pyc.

    uv run python benchmarks/bench_startup.py --repeats 5

Every Ray worker and every DVC stage is a new interpreter, so import time is paid per worker
per run. Where bytecode is not written back (PYTHONDONTWRITEBYTECODE is set on many CI and
cluster images; site-packages may be read-only), each of them compiles torch's and Ray's
sources again unless the environment was installed with `uv sync --compile-bytecode`.

Baseline, in the same run: the same import with an empty bytecode cache
(`PYTHONPYCACHEPREFIX` pointed at a fresh folder, `-B` so nothing is written), which is what a
process sees in an environment installed without compiled bytecode.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

MODULES = {
    "training loop (every Ray worker)": "attnpipe.train.loop",
    "evaluate stage": "attnpipe.evaluate.run",
    "export stage": "attnpipe.evaluate.export",
    "Ray Train (the controller, every worker)": "ray.train.torch",
}


def time_import(module: str, compiled: bool) -> float:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as empty_cache:
        command = [sys.executable, "-c", f"import {module}"]
        if not compiled:
            env["PYTHONPYCACHEPREFIX"] = empty_cache
            command.insert(1, "-B")
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs of each")
    args = parser.parse_args()
    print("| import | from source (s) | with .pyc (s) | speed-up |\n|---|---:|---:|---:|")
    for label, module in MODULES.items():
        source, compiled = [], []
        for _ in range(args.repeats):  # alternate, so load on the machine hits both alike
            source.append(time_import(module, compiled=False))
            compiled.append(time_import(module, compiled=True))
        slow, fast = statistics.median(source), statistics.median(compiled)
        print(f"| {label}: `{module}` | {slow:.2f} | {fast:.2f} | {slow / fast:.1f}x |")


if __name__ == "__main__":
    main()
