"""`benchmarks/gpu_check.py` stays runnable: its tiny CPU version, every check, in make test.

The GPU numbers themselves come from a GPU machine (docs/benchmarks.md); here the smoke run
proves the four checks run end to end (real shards through the training loop, the loop's own
step on synthetic batches, Ray Train and torchrun) and report what the table promises.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]


def test_gpu_check_smoke_runs_every_check(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    results = json.loads(out.read_text())
    assert results["smoke"] is True and results["device"].startswith("CPU")
    speed = results["model_speed"]
    # attention56 in bf16 and fp32, ResNet-50: each model timed on its own.
    assert [label.split()[1] for label in speed["images_per_s"]] == ["bf16", "fp32", "bf16"]
    assert set(speed["peak_memory_gib"]) == set(speed["images_per_s"])
    assert results["repeatability"] == {"repeatable": True, "differing_tensors": 0}
    numbers = [
        speed["efficiency"],
        speed["bf16_vs_fp32"],
        results["checkpoint"]["checkpoint_mib"],
        results["checkpoint"]["checkpoint_save_s"],
        *speed["images_per_s"].values(),
        results["input_path"]["real_images_per_s"],
        results["input_path"]["synthetic_images_per_s"],
        results["input_path"]["real_vs_synthetic"],
        results["launcher"]["ray_epoch_s"],
        results["launcher"]["torchrun_epoch_s"],
        results["launcher"]["ray_vs_torchrun"],
    ]
    assert all(math.isfinite(x) and x > 0 for x in numbers), numbers
    rows = ("FLOP-normalised efficiency", "real / synthetic", "Ray / torchrun", "bf16 / fp32")
    rows += ("checkpoint size (MiB)", "train.deterministic repeats | yes")
    for row in rows:
        assert row in done.stdout and "smoke run: not a measurement" in done.stdout


def test_gpu_check_refuses_a_cpu_without_smoke():
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 2 and "no GPU here: run with --smoke" in done.stderr
