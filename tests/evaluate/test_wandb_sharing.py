"""Evaluate and export share what they make on W&B (offline here, read back from the run file):
a run of job type evaluate / export in the group of the training run that made model.pt."""

from __future__ import annotations

import json

from tests.wandb_offline import artifacts, exit_code, finished_runs, history_rows, summary


def _runs_of(paths, job_type: str) -> list:
    runs = finished_runs(paths.root / "wandb")  # W&B may still be writing when finish() returns
    return [r for r in runs if r.info.job_type == job_type]


def test_evaluation_is_a_run_in_the_training_group_with_metrics_tables_images_and_page(
    evaluated_project,
):
    paths, metrics = evaluated_project
    runs = _runs_of(paths, "evaluate")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_group == "digits-test"  # model.pt's training run (no W&B id in it)
    assert exit_code(run.records) == 0
    values = summary(run.records)
    assert values["test/accuracy"] == metrics["accuracy"]
    assert values["test/test_samples"] == metrics["test_samples"] == 361
    assert values["test/confusion_matrix_table/_type"] == "table-file"
    assert values["test/per_class/nrows"] == 10
    assert values["test/most_confident_mistakes/_type"] == "table-file"
    [row] = history_rows(run.records)
    assert row["test/report/_type"] == "html-file"
    assert row["test/figures/confusion/_type"] == "image-file"
    captions = row["test/figures/attention_wrong/caption"]
    assert "attention" in captions
    if metrics["accuracy"] < 1:
        assert row["test/mistake_images/_type"] == "images/separated"
        assert all("→" in c for c in row["test/mistake_images/captions"])
    [report] = [a for a in artifacts(run.records) if a.type == "report"]
    [page] = report.manifest.contents
    assert page.path == "index.html"
    assert "0123456789abcdef0123456789abcdef01234567" in report.aliases  # the commit
    [data] = [a for a in artifacts(run.records) if a.type == "dataset"]
    assert data.use_after_commit  # an input of the run, once synced
    assert {c.ref for c in data.manifest.contents if c.ref} and all(
        c.ref.startswith("file://") for c in data.manifest.contents if c.ref
    )


def test_export_adds_the_onnx_file_as_a_version_of_the_model_artifact(exported_project):
    paths, result = exported_project
    [run] = _runs_of(paths, "export")
    assert run.info.run_group == "digits-test" and exit_code(run.records) == 0
    [model] = [a for a in artifacts(run.records) if a.type == "model"]
    assert model.name == "model-digits-test"  # the training run's model artifact
    assert {"onnx", "0123456789abcdef0123456789abcdef01234567"} <= set(model.aliases)
    [entry] = model.manifest.contents
    assert entry.path == "model.onnx" and entry.size == result.size_bytes
    assert json.loads(model.metadata)["format"] == "onnx"
    assert summary(run.records)["export/max_abs_diff"] == result.max_abs_diff
