"""`dvc repro` builds the digits pipeline in a fresh git repository, then finds it up to date.

Real DVC, real Ray (2 workers, gloo), W&B offline: nothing mocked. Tiny settings keep it short.
"""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
import yaml
from PIL import Image

from attnpipe.cli import main
from tests.conftest import REPO, TINY_OVERRIDES, ReproProject, run_in, stages_run
from tests.wandb_offline import artifacts, exit_code, history_rows, offline_runs, summary

# Real Ray / DVC runs: minutes on an idle 2-core machine; the allowance covers a busy one.
pytestmark = [pytest.mark.ray, pytest.mark.dvc, pytest.mark.timeout(1200)]


def test_repro_runs_every_stage_and_writes_the_contract(repro_project: ReproProject):
    root, output = repro_project.root, repro_project.output
    # Ray configured so that its placement-group cleaner has the State API it polls.
    assert "State API" not in output and "Failed to query" not in output
    # `make demo` prints no traceback and no warning (issue 27): Ray's and torch's included,
    # and with the other tests' Ray clusters on the machine (the cleaner once found those).
    noisy = [line for line in output.splitlines() if re.search("traceback|warning", line, re.I)]
    assert not noisy, "\n".join(noisy)
    assert "RAY_AUTH_MODE" not in output  # Ray's notice that it chose token auth itself
    assert stages_run(output) == {
        f"{stage}@digits" for stage in ("fetch", "prepare", "shard", "train", "evaluate", "export")
    }
    for path in (
        "data/digits/raw/train.csv",
        "data/digits/manifest.parquet",
        "data/digits/classes.json",
        "data/digits/shards/index.json",
        "models/digits/model.pt",
        "reports/digits/data.json",
        "reports/digits/class_counts.csv",
        "reports/digits/train_history.csv",
        "reports/digits/metrics.json",
        "reports/digits/train.json",
        "reports/digits/train_summary.json",
        "reports/digits/test_summary.json",
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


def test_second_repro_is_up_to_date(repro_project: ReproProject):
    root = repro_project.root
    output = run_in(root, "dvc", "repro")
    assert not stages_run(output), output
    assert "Data and pipelines are up to date." in run_in(root, "dvc", "status")


def test_metrics_and_plots_show(repro_project: ReproProject, tmp_path):
    root = repro_project.root
    metrics = run_in(root, "dvc", "metrics", "show")
    assert "reports/digits/test_summary.json" in metrics and "test_accuracy" in metrics
    assert "reports/digits/train_summary.json" in metrics and "val_accuracy" in metrics
    assert "reports/digits/data.json" in metrics
    run_in(root, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "reports_digits_train_history_csv" in page and "reports_digits_confusion_csv" in page


def test_metrics_show_fits_200_columns(repro_project: ReproProject):
    """`make demo` ends with `dvc metrics show`: a table that a terminal shows whole (the
    stages' headlines are the metrics; their records are plain outputs)."""
    table = run_in(repro_project.root, "dvc", "metrics", "show")
    assert max(map(len, table.splitlines())) <= 200, table


def test_the_shared_wandb_group_holds_training_test_results_model_and_data(
    repro_project: ReproProject, tmp_path
):
    """Acceptance: after the pipeline, the offline W&B runs of one group tell the whole story:
    the training history, test accuracy, a confusion matrix, the report page, a model
    artifact whose file `predict` accepts, and the data artifact both runs used."""
    root = repro_project.root
    runs = offline_runs(root / "wandb")
    [train] = [r for r in runs if r.info.job_type == "train"]
    group = train.info.run_group
    assert group == train.info.run_id
    in_group = {r.info.job_type: r for r in runs if r.info.run_group == group}
    assert set(in_group) == {"train", "evaluate", "export"}
    assert all(exit_code(r.records) == 0 for r in in_group.values())
    assert len(history_rows(train.records)) == TINY_OVERRIDES["train"]["epochs"]

    evaluation = summary(in_group["evaluate"].records)
    metrics = json.loads((root / "reports/digits/metrics.json").read_text())["test"]
    assert evaluation["test/accuracy"] == metrics["accuracy"]
    assert evaluation["test/confusion_matrix_table/_type"] == "table-file"
    [row] = history_rows(in_group["evaluate"].records)
    assert row["test/report/_type"] == "html-file"
    assert any(a.type == "report" for a in artifacts(in_group["evaluate"].records))

    # The data: one reference artifact (the DVC hash of the shards), an input of both runs.
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    shards_md5 = lock["stages"]["shard@digits"]["outs"][0]["md5"]
    for job in ("train", "evaluate"):
        [data] = [a for a in artifacts(in_group[job].records) if a.type == "dataset"]
        assert data.name == "data-digits" and data.use_after_commit
        assert json.loads(data.metadata)["data_version"] == f"dvc:{shards_md5}"
        assert all(c.ref.startswith("file://") or c.size < 200 for c in data.manifest.contents)

    # The model: model.pt with aliases, which `predict` takes as downloaded (here: as staged).
    [model] = [a for a in artifacts(train.records) if a.type == "model"]
    assert {"best", lock_commit(root)} <= set(model.aliases)
    [entry] = model.manifest.contents
    assert entry.path == "model.pt"
    downloaded = tmp_path / "artifact" / "model.pt"
    downloaded.parent.mkdir()
    shutil.copy(entry.local_path, downloaded)
    Image.new("RGB", (8, 8), (200, 200, 200)).save(tmp_path / "digit.png")
    for model_file, out in (
        (downloaded, "artifact.csv"),
        (root / "models/digits/model.pt", "stage.csv"),
    ):
        code = main(
            [
                "predict",
                str(tmp_path / "digit.png"),
                "-m",
                str(model_file),
                "-o",
                str(tmp_path / out),
            ]
        )
        assert code == 0
    assert (tmp_path / "artifact.csv").read_text() == (tmp_path / "stage.csv").read_text()
    [onnx] = [a for a in artifacts(in_group["export"].records) if a.type == "model"]
    assert onnx.name == model.name and "onnx" in onnx.aliases


def lock_commit(root) -> str:
    return run_in(root, "git", "rev-parse", "HEAD").strip()


def test_the_readme_wandb_figure_is_drawn_from_the_offline_runs(
    repro_project: ReproProject, tmp_path
):
    """docs/wandb.md's `python docs/wandb_story.py . docs/images/wandb_story.png`, on the demo
    build."""
    figure = tmp_path / "wandb_story.png"
    output = run_in(
        repro_project.root, sys.executable, str(REPO / "docs/wandb_story.py"), ".", str(figure)
    )
    assert f"wrote {figure}" in output
    with Image.open(figure) as image:
        assert image.format == "PNG" and image.width > 800
