"""A job's outputs on shared storage and their way home, without Ray: the layout, the
manifest, the all-or-nothing download, `attnpipe pull`, the job command's --set, and the
stored run that evaluate scores inside a job."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from attnpipe import joboutputs, jobs, runs, storage
from attnpipe.cli import main
from attnpipe.config import parse_assignments
from attnpipe.joboutputs import OutputsError
from attnpipe.paths import PipelinePaths
from tests.conftest import REPO

RUN_ID = "digits-0123456789"


def _job_project(root: Path) -> PipelinePaths:
    """A project as an evaluate job leaves it: the report, and the W&B run metrics.json names."""
    paths = PipelinePaths(root, "digits")
    paths.figures.mkdir(parents=True)
    (paths.figures / "confusion.png").write_bytes(b"png from the job")
    wandb = {"run_id": RUN_ID, "run_path": f"attnpipe/{RUN_ID}", "folder": None}
    paths.metrics.write_text(json.dumps({"test": {"accuracy": 0.9}, "wandb": wandb}))
    for target in (paths.test_summary, paths.confusion, paths.per_class, paths.report_html):
        target.write_text(f"{target.name} from the job\n")
    run = root / "wandb" / f"offline-run-20260101_000000-{RUN_ID}"
    (run / "files").mkdir(parents=True)
    (run / f"run-{RUN_ID}.wandb").write_bytes(b"w" * 100)
    (run / "files" / "config.yaml").write_text("a: 1\n")
    other = root / "wandb" / "offline-run-20260101_000000-someone-else"  # not this stage's
    other.mkdir()
    (other / "x.wandb").write_text("x")
    return paths


def _home(root: Path) -> PipelinePaths:
    """The workstation: an older report, with a figure the new one no longer has."""
    paths = PipelinePaths(root, "digits")
    paths.figures.mkdir(parents=True)
    (paths.figures / "stale.png").write_bytes(b"old")
    paths.metrics.write_text('{"test": {"accuracy": 0.1}}')
    return paths


@pytest.fixture(params=["folder", "s3"])
def storage_path(request, tmp_path) -> str:
    """A shared folder, or a bucket on the test's S3 server (moto on loopback)."""
    if request.param == "folder":
        return str(tmp_path / "shared" / "ckpt")
    return request.getfixturevalue("s3_bucket").url("ckpt")


def test_outputs_round_trip_to_where_a_local_run_writes_them(tmp_path, storage_path):
    job = _job_project(tmp_path / "job")
    published = joboutputs.publish("evaluate", storage_path, job, job_id="job-1", say=print)
    assert published.location == f"{storage_path}/digits/outputs/evaluate/job-1"
    listed = storage.list_tree(published.location)
    assert "manifest.json" in listed and "reports/digits/figures/confusion.png" in listed
    assert not any("someone-else" in name for name in listed)  # only this stage's W&B run
    latest = json.loads(storage.read_bytes(f"{storage_path}/digits/outputs/evaluate/latest.json"))
    assert latest["job_id"] == "job-1"

    home = _home(tmp_path / "home")
    found = joboutputs.find_published(storage_path, "digits", "evaluate")
    entries = joboutputs.bring_home(found, home)
    assert "reports/digits/figures" in entries
    for name in ("metrics.json", "test_summary.json", "confusion.csv", "index.html"):
        assert (home.reports / name).read_bytes() == (job.reports / name).read_bytes()
    # A folder output replaces the local one whole: no stale figure stays behind.
    assert sorted(p.name for p in home.figures.iterdir()) == ["confusion.png"]
    run = f"wandb/offline-run-20260101_000000-{RUN_ID}"
    assert (home.root / run / f"run-{RUN_ID}.wandb").read_bytes() == b"w" * 100
    assert (home.root / run / "files" / "config.yaml").is_file()
    assert not list(home.root.glob(".attnpipe-pull-*"))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_broken_download_changes_nothing_here(tmp_path):
    shared = str(tmp_path / "shared")
    job = _job_project(tmp_path / "job")
    published = joboutputs.publish("evaluate", shared, job, job_id="job-2", say=print)
    home = _home(tmp_path / "home")
    before = _snapshot(home.root)

    # A file missing on storage: the download fails before anything local is replaced.
    Path(shared, "digits/outputs/evaluate/job-2/reports/digits/index.html").unlink()
    with pytest.raises(FileNotFoundError):
        joboutputs.bring_home(published, home)
    assert _snapshot(home.root) == before
    assert not list(home.root.glob(".attnpipe-pull-*"))

    # A file of another size than the manifest says (rewritten meanwhile): refused as well.
    Path(shared, "digits/outputs/evaluate/job-2/reports/digits/index.html").write_text("x")
    with pytest.raises(OutputsError, match="manifest says"):
        joboutputs.bring_home(published, home)
    assert _snapshot(home.root) == before


@pytest.mark.parametrize(
    "name", ["../outside.txt", "src/attnpipe/jobs.py", "reports/other/metrics.json", "/etc/x"]
)
def test_a_manifest_cannot_write_outside_the_pipelines_outputs(tmp_path, name):
    manifest = {"stage": "evaluate", "job_id": "j", "entries": [name], "files": {name: 1}}
    with pytest.raises(OutputsError, match="refusing"):
        joboutputs.bring_home(joboutputs.Published(str(tmp_path), manifest), _home(tmp_path))


def test_a_failed_job_publishes_nothing_that_pull_would_take(tmp_path, capsys):
    shared = str(tmp_path / "shared")
    # A failed job may leave files, never a manifest, and latest.json does not move to it.
    partial = Path(shared, "digits/outputs/evaluate/job-failed/reports/digits")
    partial.mkdir(parents=True)
    (partial / "metrics.json").write_text("{}")
    assert joboutputs.find_published(shared, "digits", "evaluate", "job-failed") is None
    assert joboutputs.find_published(shared, "digits", "evaluate") is None

    root = tmp_path / "home"
    shutil.copytree(REPO / "pipelines", root / "pipelines")
    argv = ["--root", str(root), "pull", "digits", "--set", f"train.storage_path={shared}"]
    assert main([*argv, "--job", "job-failed"]) == 1
    assert "no published outputs of job job-failed" in capsys.readouterr().err
    assert not (root / "reports").exists()


def test_pull_brings_home_each_stages_newest_outputs(tmp_path, capsys):
    shared = str(tmp_path / "shared")
    job = _job_project(tmp_path / "job")
    joboutputs.publish("evaluate", shared, job, job_id="old", say=print)
    (job.reports / "index.html").write_text("the newer report\n")
    joboutputs.publish("evaluate", shared, job, job_id="new", say=print)
    (job.reports / "tune_trials.csv").write_text("trial_id\nt1\n")
    (job.reports / "best_params.yaml").write_text("train.optimizer.lr: 0.01\n")
    joboutputs.publish("tune", shared, job, job_id="sweep", say=print)

    root = tmp_path / "home"
    shutil.copytree(REPO / "pipelines", root / "pipelines")
    argv = ["--root", str(root), "pull", "digits", "--set", f"train.storage_path={shared}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "evaluate outputs of job new" in out and "tune outputs of job sweep" in out
    assert (root / "reports/digits/index.html").read_text() == "the newer report\n"
    assert (root / "reports/digits/best_params.yaml").is_file()
    assert not (root / "models").exists()  # no train job published anything

    assert main([*argv, "--job", "old", "--stage", "evaluate"]) == 0
    assert (root / "reports/digits/index.html").read_text() == "index.html from the job\n"

    assert main(["--root", str(root), "pull", "digits"]) == 1  # the recipe names no storage
    assert "train.storage_path is not set" in capsys.readouterr().err


def test_the_stage_outputs_are_the_stages_dvc_outputs(tmp_path):
    """What a job publishes is what dvc.yaml says the stage writes (tune's own checkpoint
    folder aside: its trials live in train.storage_path on a cluster)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    paths = PipelinePaths(Path("."), "${item}")
    for stage in joboutputs.PUBLISHED_STAGES:
        declared = set()
        for kind in ("outs", "metrics", "plots"):
            for item in stages[stage]["do"].get(kind, []):
                declared.add(next(iter(item)) if isinstance(item, dict) else item)
        declared.discard("models/${item}/tune")
        published = {p.as_posix() for p in joboutputs.stage_entries(stage, paths)}
        assert published == declared, stage


def test_the_job_command_carries_every_recipe_change():
    changes = {
        "train.storage_path": "s3://bucket/ckpt",
        "train.optimizer.lr": 0.01,
        "tune.space": {"train.optimizer.lr": {"type": "grid", "values": [0.1, 0.01]}},
        "train.compile": True,
        "model.kwargs.name": "1",  # a string that YAML would read as a number
        "evaluate.note": "two words; $HOME",
    }
    command = jobs.stage_command("tune", "digits", changes)
    words = shlex.split(command)
    assert words[:3] == ["attnpipe", "tune", "digits"]
    assignments = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    assert parse_assignments(assignments) == changes


def test_every_submitted_stage_needs_shared_storage(tmp_path):
    root = tmp_path / "project"
    shutil.copytree(REPO / "pipelines", root / "pipelines")
    recipe = yaml.safe_load((root / "pipelines/digits.yaml").read_text())
    recipe["shard"]["publish_to"] = "s3://bucket/digits/shards"
    (root / "pipelines/digits.yaml").write_text(yaml.safe_dump(recipe))
    for stage in jobs.SUBMIT_STAGES:
        (problem,) = jobs.check_recipe_for_cluster(root, "digits", stage)
        assert "train.storage_path" in problem
    changes = {"train.storage_path": "s3://bucket/ckpt"}  # as `submit --set` gives it
    assert jobs.check_recipe_for_cluster(root, "digits", "evaluate", changes) == []


def test_evaluate_in_a_job_reads_the_runs_model_from_storage(digits_project, tmp_path):
    from attnpipe.evaluate.stored_run import StoredRunError, stored_run_inputs
    from attnpipe.train.launch import build_loop_config

    recipe, paths = digits_project
    recipe = recipe.model_copy(
        update={"train": recipe.train.model_copy(update={"storage_path": str(tmp_path)})}
    )
    run = runs.current_run_name(recipe, paths)
    assert run == build_loop_config(recipe, paths).run_name  # the run train makes
    missing = pytest.raises(StoredRunError, match=f"'{run}' has no model.*--stage train")
    with missing, stored_run_inputs(recipe, paths):
        pass
    storage.write_bytes(runs.run_model_location(str(tmp_path), run), b"the run's model")
    storage.write_bytes(runs.run_history_location(str(tmp_path), run), b"epoch\n1\n")
    with stored_run_inputs(recipe, paths) as inputs:
        assert inputs.model_file.read_bytes() == b"the run's model"
        assert inputs.train_history.read_text() == "epoch\n1\n"
        assert inputs.reports == paths.reports  # the outputs go where they always do
    assert not inputs.model_file.exists()  # a private folder, gone afterwards


def test_with_attnpipe_cluster_set_the_ray_stages_submit_themselves(tmp_path, monkeypatch, capsys):
    """The hook `ATTNPIPE_CLUSTER=http://HEAD:8265 dvc repro` uses: the stage command submits
    itself with its recipe changes (and, through `submit`, brings its outputs home)."""
    import argparse

    from attnpipe.cli.cluster import submitted_to_cluster

    calls = []

    def fake_submit(root, pipeline, address, stage="train", changes=None, **_):
        calls.append((pipeline, address, stage, changes))
        failed = stage == "tune"
        return jobs.JobOutcome("job-9", "FAILED" if failed else "SUCCEEDED", int(failed))

    monkeypatch.setattr(jobs, "submit", fake_submit)
    monkeypatch.setenv(jobs.CLUSTER_ENV, "http://head:8265")
    root = tmp_path / "project"
    shutil.copytree(REPO / "pipelines", root / "pipelines")
    assert main(["--root", str(root), "train", "digits", "--set", "train.epochs=2"]) == 0
    assert calls == [("digits", "http://head:8265", "train", {"train.epochs": 2})]
    assert "runs as a job at http://head:8265" in capsys.readouterr().out
    assert main(["--root", str(root), "tune", "digits"]) == 1
    assert "ended FAILED; nothing was brought home" in capsys.readouterr().err

    # Inside a job, or with --address (join a cluster from here), the stage runs here.
    args = argparse.Namespace(root=root, pipeline="digits", address="ray://head:10001")
    assert not submitted_to_cluster("train", args)
    monkeypatch.setenv(joboutputs.OUTPUTS_ENV, "1")
    args.address = None
    assert not submitted_to_cluster("evaluate", args)
    assert len(calls) == 2
