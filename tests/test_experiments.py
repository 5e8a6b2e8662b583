"""DVC experiments and W&B runs that name each other; experiments that share the machine.

Fast, in-process checks of the pieces; tests/e2e/test_dvc_experiments.py runs real queued
experiments end to end.
"""

from __future__ import annotations

import pytest

from attnpipe.config import apply_overrides, load_recipe
from attnpipe.paths import PipelinePaths
from attnpipe.raycluster import ClusterError, private_cluster_cpus
from attnpipe.tracking import ExperimentIdentity, experiment_identity, wandb_run_folder
from attnpipe.train.launch import run_identity
from tests.conftest import REPO

BASELINE = "0123456789abcdef0123456789abcdef01234567"


def test_the_experiment_comes_from_dvcs_variables():
    found = experiment_identity({"DVC_EXP_NAME": "fiery-bush", "DVC_EXP_BASELINE_REV": BASELINE})
    assert found == ExperimentIdentity("fiery-bush", BASELINE)
    assert found.tags == ["dvc-exp:fiery-bush", "dvc-baseline:0123456789"]
    assert found.as_config() == {"name": "fiery-bush", "baseline_rev": BASELINE}
    outside = experiment_identity({"DVC_ROOT": "/somewhere"})  # `dvc repro`: no experiment
    assert outside == ExperimentIdentity() and outside.tags == [] and not outside.run_id_suffix()


def test_experiments_never_share_a_wandb_run_but_find_the_same_checkpoints():
    recipe = load_recipe("digits", REPO)
    plain = run_identity(recipe, "dvc:abc", "code1")
    first = run_identity(recipe, "dvc:abc", "code1", ExperimentIdentity("exp-a", BASELINE))
    second = run_identity(recipe, "dvc:abc", "code1", ExperimentIdentity("exp b/2", BASELINE))
    # The Ray run (its checkpoints) follows the training settings alone ...
    assert plain[0] == first[0] == second[0]
    # ... the W&B run also the experiment; characters W&B refuses in an id are replaced.
    assert len({plain[1], first[1], second[1]}) == 3
    assert first[1] == f"{plain[0]}-exp-a" and second[1] == f"{plain[0]}-exp_b_2"
    longer = run_identity(recipe, "dvc:abc", "code1", ExperimentIdentity("x" * 100))
    assert len(longer[1]) == 64
    # A training setting changes both.
    changed = apply_overrides(recipe, {"train": {"epochs": 1}}, "test")
    assert run_identity(changed, "dvc:abc", "code1")[0] != plain[0]


@pytest.mark.parametrize(
    "key, value",
    [
        ("train.loader_workers", 3),
        ("train.max_failures", 7),
        ("train.cpus_per_worker", 4),
        ("train.checkpoints_to_keep", 5),
        ("train.storage_path", "s3://bucket/checkpoints"),
    ],
)
def test_how_a_run_executes_is_not_its_identity(key, value):
    """Changing one of these resumes the run (same name: same checkpoint folder)."""
    recipe = load_recipe("digits", REPO)
    changed = apply_overrides(recipe, {key: value}, "test")
    assert run_identity(changed, "dvc:abc", "code1") == run_identity(recipe, "dvc:abc", "code1")


@pytest.mark.parametrize(
    "key, value",
    [
        ("train.optimizer.lr", 0.05),
        ("train.batch_size", 16),
        ("train.workers", 3),
        ("train.seed", 1),
        ("train.amp", "bf16"),
        ("augment.rotation_degrees", 0),
        ("model.input_size", 48),
    ],
)
def test_what_shapes_the_weights_is_a_new_run(key, value):
    recipe = load_recipe("digits", REPO)
    changed = apply_overrides(recipe, {key: value}, "test")
    assert (
        run_identity(changed, "dvc:abc", "code1")[0] != run_identity(recipe, "dvc:abc", "code1")[0]
    )


def test_runs_and_checkpoints_outlive_dvcs_temporary_copy(tmp_path, monkeypatch):
    workspace = tmp_path / "project"
    copy = workspace / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(workspace))
    in_copy = PipelinePaths(copy, "digits")
    assert in_copy.workspace == workspace.resolve()
    assert in_copy.checkpoints == workspace.resolve() / "models" / "digits" / "checkpoints"
    assert in_copy.wandb_parent == workspace.resolve()
    # What the experiment produces as outputs stays in the copy (DVC collects it from there).
    assert in_copy.model_file == copy / "models" / "digits" / "model.pt"
    assert in_copy.train_metrics == copy / "reports" / "digits" / "train.json"
    # `dvc repro` in the workspace, or a DVC_ROOT left over from elsewhere: the root itself.
    assert PipelinePaths(workspace, "digits").workspace == workspace
    elsewhere = tmp_path / "other"
    assert PipelinePaths(elsewhere, "digits").checkpoints == elsewhere / "models/digits/checkpoints"
    monkeypatch.delenv("DVC_ROOT")
    assert in_copy.workspace == copy


def test_the_newest_local_folder_of_a_wandb_run_is_found(tmp_path):
    runs = tmp_path / "wandb"
    for name in (
        "offline-run-20260101_000000-digits-1-exp",
        "offline-run-20260102_000000-digits-1-exp",  # the resumed launch
        "offline-run-20260103_000000-digits-1-exp-other",
    ):
        (runs / name).mkdir(parents=True)
    assert wandb_run_folder(tmp_path, "digits-1-exp").name.startswith("offline-run-20260102")
    assert wandb_run_folder(tmp_path, "digits-2") is None


def test_a_private_cluster_takes_its_share_of_cpus(monkeypatch):
    monkeypatch.delenv("ATTNPIPE_RAY_CPUS", raising=False)
    assert private_cluster_cpus(1) >= 1
    assert private_cluster_cpus(10_000) == 10_000  # at least what the work needs
    monkeypatch.setenv("ATTNPIPE_RAY_CPUS", "3")
    assert private_cluster_cpus(2) == 3
    with pytest.raises(ClusterError, match=r"ATTNPIPE_RAY_CPUS=3 but the work needs 4 CPU"):
        private_cluster_cpus(4)
    for bad in ("0", "two", "-1", "1.5"):
        monkeypatch.setenv("ATTNPIPE_RAY_CPUS", bad)
        with pytest.raises(ClusterError, match="not a whole number of CPUs"):
            private_cluster_cpus(1)
