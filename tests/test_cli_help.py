"""Every command's --help says what it does, what it reads and what it writes."""

from __future__ import annotations

import pytest

from attnpipe.cli import main
from tests.conftest import one_thread

STAGE_OUTPUTS = {
    "fetch": ["data/<name>/raw/"],
    "prepare": ["manifest.parquet", "rejected.csv", "reports/<name>/data.json"],
    "shard": ["data/<name>/manifest.parquet", "index.json", "publish_to", "--publish"],
    "train": ["data/<name>/shards/", "models/<name>/model.pt", "train_history.csv", "resume"],
    "evaluate": [
        "models/<name>/model.pt",
        "metrics.json",
        "confusion.csv",
        "per_class.csv",
        "reports/<name>/figures/",
        "reports/<name>/index.html",
        "train_history.csv",
        "evaluate.threshold",
    ],
    "export": [
        "models/<name>/model.pt",
        "models/<name>/model.onnx",
        "dynamic batch",
        "ONNX Runtime",
        "real test images",
        "latency",
        "--opset",
    ],
}


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as caught:
        main([*argv, "--help"])
    assert caught.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_top_level_help_lists_every_command(capsys):
    text = _help(capsys)
    for command in [*STAGE_OUTPUTS, "predict", "run", "models", "tune", "submit", "jobs"]:
        assert command in text
    assert "dvc repro" in text


@pytest.mark.parametrize("stage", sorted(STAGE_OUTPUTS))
def test_stage_help_names_inputs_and_outputs(capsys, stage):
    text = _help(capsys, stage)
    for fragment in STAGE_OUTPUTS[stage]:
        assert fragment in text, f"`attnpipe {stage} --help` should mention {fragment}"


def test_tune_and_overrides_help(capsys):
    text = _help(capsys, "tune")
    for fragment in ("tune.space", "ASHA", "tune_trials.csv", "best_params.yaml", "resumes"):
        assert fragment in text
    assert "best_params.yaml" in _help(capsys, "train")  # the --overrides switch


def test_models_help_and_table(capsys):
    assert "parameters" in _help(capsys, "models")
    with one_thread():  # it builds and runs every model; the table does not depend on threads
        assert main(["models"]) == 0
    table = capsys.readouterr().out
    for name in ("attention56", "attention92_cifar", "attnvgg16", "streamlined_resnet50"):
        assert name in table


def test_submit_help_says_what_is_uploaded_passed_and_returned(capsys):
    text = _help(capsys, "submit")
    for fragment in (
        "Ray job",
        "working directory",
        "never data/",
        "512 MiB",
        ".gitignore",
        "shard.publish_to",
        "train.storage_path",
        "AWS_* and WANDB_*",
        "never printed",
        "exit with the job's status",
        "metrics",
        "--no-wait",
        "attnpipe jobs logs ID --follow",
        "--stage",
        "--address",
    ):
        assert fragment in text, f"`attnpipe submit --help` should mention {fragment}"


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (("jobs",), ["list", "logs", "stop", "--all", "RAY_API_SERVER_ADDRESS"]),
        (("jobs", "list"), ["status", "--all", "--address"]),
        (("jobs", "logs"), ["--follow", "exit with its status"]),
        (("jobs", "stop"), ["checkpointed", "resumes"]),
    ],
)
def test_jobs_help(capsys, argv, fragments):
    text = _help(capsys, *argv)
    for fragment in fragments:
        assert fragment in text, f"`attnpipe {' '.join(argv)} --help` should mention {fragment}"


def test_predict_help_names_inputs_outputs_and_exit_status(capsys):
    text = _help(capsys, "predict")
    for fragment in (
        "model.pt",
        "model.onnx",
        "folders",
        "--output FILE.csv",
        "probability",
        "error line",
        "--kaggle-submission",
        "submission.csv",
        "image_id,label",
        "--sample-submission",
        "Exit status: 0 when every file was predicted, 1 when any failed",
    ):
        assert fragment in text, f"`attnpipe predict --help` should mention {fragment}"
