"""`dvc repro` builds the digits pipeline in a fresh git repository, then finds it up to date.

Real DVC, real Ray (2 workers, gloo), W&B offline: nothing mocked. Tiny settings keep it short.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_OVERRIDES, write_project

pytestmark = pytest.mark.slow

GIT_ID = {
    "GIT_AUTHOR_NAME": "attnpipe tests",
    "GIT_AUTHOR_EMAIL": "tests@attnpipe.invalid",
    "GIT_COMMITTER_NAME": "attnpipe tests",
    "GIT_COMMITTER_EMAIL": "tests@attnpipe.invalid",
}


def _run(root: Path, *command: str) -> str:
    env = {
        **os.environ,
        **GIT_ID,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "WANDB_MODE": "offline",
    }
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{output[-4000:]}"
    return output


def _stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


@pytest.fixture(scope="module")
def built_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = write_project(tmp_path_factory.mktemp("dvcproject"), TINY_OVERRIDES)
    (root / ".gitignore").write_text("wandb/\n")
    _run(root, "git", "init", "-q")
    _run(root, "dvc", "init", "-q")
    _run(root, "dvc", "config", "core.analytics", "false")
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-q", "-m", "pipeline")
    output = _run(root, "dvc", "repro")
    return root, output


def test_repro_runs_every_stage_and_writes_the_contract(built_project):
    root, output = built_project
    assert _stages_run(output) == {
        f"{stage}@digits" for stage in ("fetch", "prepare", "shard", "train", "evaluate", "export")
    }
    for path in (
        "data/digits/raw/train.csv",
        "data/digits/manifest.parquet",
        "data/digits/classes.json",
        "data/digits/shards/index.json",
        "models/digits/model.pt",
        "reports/digits/data.json",
        "reports/digits/train_history.csv",
        "reports/digits/metrics.json",
        "reports/digits/confusion.csv",
        "reports/digits/per_class.csv",
        "reports/digits/figures/confusion.png",
        "reports/digits/index.html",
        "models/digits/model.onnx",
    ):
        assert (root / path).is_file(), path
    metrics = json.loads((root / "reports/digits/metrics.json").read_text())["test"]
    assert metrics["test_samples"] == 361
    assert metrics["accuracy"] > 0.3  # two tiny epochs; chance is 0.1
    history = (root / "reports/digits/train_history.csv").read_text().splitlines()
    assert len(history) == 1 + TINY_OVERRIDES["train"]["epochs"]


def test_second_repro_is_up_to_date(built_project):
    root, _ = built_project
    output = _run(root, "dvc", "repro")
    assert not _stages_run(output), output
    assert "Data and pipelines are up to date." in _run(root, "dvc", "status")


def test_metrics_and_plots_show(built_project):
    root, _ = built_project
    metrics = _run(root, "dvc", "metrics", "show")
    assert "reports/digits/metrics.json" in metrics and "test.accuracy" in metrics
    assert "reports/digits/data.json" in metrics
    _run(root, "dvc", "plots", "show", "-o", "plots_out")
    page = (root / "plots_out" / "index.html").read_text()
    # The history plot has a custom title (dvc.yaml), so its path never appears in the page.
    assert "validation accuracy per epoch" in page and "confusion.csv" in page


def test_exp_run_with_a_training_param_reruns_only_the_model_stages(built_project):
    root, _ = built_project
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-q", "-m", "built")
    output = _run(root, "dvc", "exp", "run", "-S", "pipelines/digits.yaml:train.optimizer.lr=0.002")
    assert _stages_run(output) == {"train@digits", "evaluate@digits", "export@digits"}, output
