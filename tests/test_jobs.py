"""The parts of `attnpipe submit` that need no cluster: what is uploaded, passed and parsed."""

from __future__ import annotations

import shutil

import pytest
import yaml

from attnpipe import jobs
from attnpipe.cli import main
from tests.conftest import REPO


def test_passthrough_takes_aws_and_wandb_but_not_local_paths_or_profiles():
    environ = {
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_PROFILE": "laptop-profile",
        "AWS_SHARED_CREDENTIALS_FILE": "/home/me/.aws/credentials",
        "AWS_CA_BUNDLE": "/etc/ssl/cert.pem",
        "WANDB_API_KEY": "wandb-key-123",
        "WANDB_DIR": "/home/me/wandb",
        "HF_TOKEN": "hf-token-456",
        "HOME": "/home/me",
    }
    env = jobs.passthrough_env(["HF_TOKEN"], environ=environ)
    assert env == {
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "WANDB_API_KEY": "wandb-key-123",
        "HF_TOKEN": "hf-token-456",
    }
    with pytest.raises(jobs.JobError, match="NOPE"):
        jobs.passthrough_env(["NOPE"], environ=environ)
    secrets = jobs.secret_values(env)
    assert set(secrets) == {"s3cr3t-value", "wandb-key-123", "hf-token-456"}
    assert jobs.mask("key=s3cr3t-value token hf-token-456", secrets) == "key=*** token ***"


def test_runtime_env_ships_the_code_and_excludes_data(tmp_path):
    root = tmp_path / "project"
    shutil.copytree(REPO / "src", root / "src")
    for name in ("pyproject.toml", "dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root)
    shutil.copytree(REPO / "pipelines", root / "pipelines")
    big = [  # 1 GiB each (sparse): one of them in the upload would show
        "data/digits/shards/train-00000.tar",
        "models/digits/checkpoints/run/checkpoint.pt",
        ".venv/lib/x.py",
        "wandb/run/x.wandb",
        ".dvc/cache/files/md5/ab/cdef",
        ".git/objects/pack/p.pack",
        "src/attnpipe/__pycache__/cli.cpython-311.pyc",
        "notes/ignored-by-gitignore.log",
    ]
    for name in big:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        with (root / name).open("wb") as handle:
            handle.truncate(2**30)
    (root / ".gitignore").write_text("*.log\n")
    (root / "models/digits/model.pt").write_bytes(b"m" * 10)

    plan = jobs.plan_upload(root)
    assert plan.bytes < 2**20  # none of the excluded files
    assert plan.files > 10  # the code, recipes and model.pt are there
    biggest_source = max((root / "src").rglob("*.py"), key=lambda path: path.stat().st_size)
    assert biggest_source.relative_to(root).as_posix() in dict(plan.largest)
    # Excludes are anchored at the root: the package's own data/ and train/ ship.
    assert {"src/attnpipe/data/shard.py", "src/attnpipe/data/loaders.py"} <= plan.names
    assert "models/digits/model.pt" in plan.names
    assert not {n for n in plan.names if n.startswith(("data/", ".venv/", "wandb/", ".git/"))}

    runtime_env = jobs.build_runtime_env(root, {"AWS_ACCESS_KEY_ID": "id"})
    assert runtime_env["working_dir"] == str(root)
    assert runtime_env["env_vars"]["PYTHONPATH"] == "src"  # relative to the unpacked copy
    excluded = {"/data/", "/models/*/checkpoints/", "/.venv/", "/wandb/", "/.dvc/cache/", ".git/"}
    assert excluded <= set(runtime_env["excludes"])
    assert runtime_env["env_vars"]["AWS_ACCESS_KEY_ID"] == "id"
    assert runtime_env["env_vars"][jobs.RESULT_ENV] == "1"


def test_results_line_round_trips(capsys, monkeypatch):
    jobs.print_results("train", {"metrics": {"val_accuracy": 0.5}})
    assert capsys.readouterr().out == ""  # only inside a job
    monkeypatch.setenv(jobs.RESULT_ENV, "1")
    jobs.print_results("train", {"metrics": {"val_accuracy": 0.5}, "best_epoch": 2})
    line = capsys.readouterr().out
    logs = f"epoch 1/2 ...\n(raylet) noise\n{line}more output\n"
    assert jobs.parse_results(logs) == {
        "stage": "train",
        "best_epoch": 2,
        "metrics": {"val_accuracy": 0.5},
    }
    assert jobs.parse_results("no results here") is None


def test_address_comes_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address, not the job server
    with pytest.raises(jobs.JobError, match="--address"):
        jobs.job_address(None)
    assert jobs.job_address("http://head:8265") == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")
    assert jobs.job_address(None) == "http://api:8265"


def test_submit_refuses_recipes_whose_data_would_not_reach_the_cluster(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:9")  # never contacted
    root = tmp_path / "project"
    shutil.copytree(REPO / "pipelines", root / "pipelines")
    assert main(["--root", str(root), "submit", "nope"]) == 1
    assert "unknown pipeline 'nope'" in capsys.readouterr().err

    assert main(["--root", str(root), "submit", "digits"]) == 1
    err = capsys.readouterr().err
    assert "shard.publish_to is not set" in err and "train.storage_path" in err

    recipe = yaml.safe_load((root / "pipelines/digits.yaml").read_text())
    recipe["shard"]["publish_to"] = "s3://bucket/digits/shards"
    (root / "pipelines/digits.yaml").write_text(yaml.safe_dump(recipe))
    # Every stage needs shared storage: evaluate reads the training run's model from it, and
    # each job publishes its outputs there (tests/test_joboutputs.py).
    for stage in ("train", "evaluate"):
        assert "train.storage_path" in jobs.check_recipe_for_cluster(root, "digits", stage)[0]
