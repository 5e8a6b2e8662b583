"""An elastic run (`train.workers: [1, 2]`) loses a host for good and finishes on the other.

Two Ray hosts in network namespaces (the fixture of tests/train/test_multihost.py): a head on
host A and a node on host B, one CPU each. The run starts with one rank per host; once the
checkpoint of epoch 2 is recorded, every process of host B is killed and B never comes back.
Ray Train's elastic scaling restarts the worker group with the one rank host A can hold, from
that checkpoint, and the run ends: every epoch once in the history and in W&B, each row with
the world size that trained it, and the learning rate where the samples seen put it (not where
the new world size's step count would).

GCS health checks are tightened (a dead host is noticed in about two seconds, not fifteen):
what is tested is the run's behaviour after the loss, not Ray's detection delay.
"""

from __future__ import annotations

import csv
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from attnpipe.config import load_recipe
from attnpipe.data.loaders import split_info, train_batches
from attnpipe.train.schedules import lr_factor, scaled_lr
from tests.train.rayhosts import (
    QUICK_NODE_DEATH,
    RayHosts,
    attempts,
    running_ray_hosts,
    tail,
    wait_until,
)
from tests.train.trace import recorded_epoch
from tests.wandb_offline import history_rows, read_records, run_ids

pytestmark = [pytest.mark.ray, pytest.mark.netns, pytest.mark.timeout(1200)]

EPOCHS = 4
KILL_AFTER = 2  # epochs recorded before host B dies


@pytest.fixture
def ray_hosts(tmp_path: Path) -> Iterator[RayHosts]:
    """W&B offline on every node; the head's GCS declares a silent node dead within ~2 s."""
    with running_ray_hosts(tmp_path, WANDB_MODE="offline", **QUICK_NODE_DEATH) as hosts:
        yield hosts


def elastic_project(digits_project, destination: Path) -> Path:
    """The tiny digits project with an elastic [1, 2] and a schedule that moves every step."""
    _, built = digits_project
    shutil.copytree(built.root, destination)
    recipe_file = destination / "pipelines" / "digits.yaml"
    recipe = yaml.safe_load(recipe_file.read_text())
    recipe["train"].update(
        epochs=EPOCHS,
        workers=[1, 2],
        cpus_per_worker=1,
        use_gpu=False,
        max_failures=2,
        optimizer={"name": "sgd", "lr": 0.05, "scale_lr": "linear", "reference_batch": 64},
        schedule={"name": "cosine", "warmup_epochs": 0},
    )
    recipe["tracking"] = {"wandb": {"mode": "offline"}}
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return destination


def test_an_elastic_run_finishes_on_the_host_that_is_left(digits_project, ray_hosts, tmp_path):
    hosts: RayHosts = ray_hosts
    project = elastic_project(digits_project, tmp_path / "project")
    trace = Path(hosts.env["ATTNPIPE_TRACE_DIR"])
    checkpoints = project / "models" / "digits" / "checkpoints"
    log = hosts.logs / "train.log"
    command = [sys.executable, "-m", "attnpipe.cli", "--root", str(project), "train", "digits"]
    # As a shell that ran a fixed-size job before would hand it down: the elastic run must
    # still retry its placement after 30 s, not wait out these 600.
    env = {**hosts.env, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}
    with log.open("w") as out:
        driver = subprocess.Popen(
            hosts.head.command(*command, "--address", hosts.address),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: recorded_epoch(checkpoints) >= KILL_AFTER,
            f"the checkpoint of epoch {KILL_AFTER}",
            driver,
            log,
            600,
        )
        killed = hosts.node.kill_all()  # and no replacement joins
        assert killed
        try:
            driver.wait(timeout=600)
        except subprocess.TimeoutExpired:
            pytest.fail(f"train did not finish on the host left within 600s:\n{tail(log)}")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
    output = tail(log, 80)
    assert driver.returncode == 0, output
    assert "(1-2 worker(s), elastic, CPU)" in log.read_text()

    # Two attempts: both hosts, then host A alone (rank 0 only), from a recorded checkpoint.
    first, second = _attempt_nodes(trace, hosts)
    assert first == {hosts.head.address, hosts.node.address}, output
    assert second == {hosts.head.address}, output
    resumed = attempts(trace, 0)[1][0]["epoch"]
    assert resumed >= KILL_AFTER, output

    rows = _history(project)
    assert [row["epoch"] for row in rows] == list(range(1, EPOCHS + 1))
    assert [row["world_size"] for row in rows] == [2] * resumed + [1] * (EPOCHS - resumed)
    _check_learning_rates(project, rows, resumed)
    _check_wandb(project, rows)


def _attempt_nodes(trace: Path, hosts: RayHosts) -> tuple[set[str], set[str]]:
    """The host addresses of each attempt's ranks (from the workers' trace events)."""
    by_node = {n["id"]: n["ip"] for n in hosts.nodes()}
    placed: list[set[str]] = [set(), set()]
    for rank in (0, 1):
        for index, run in enumerate(attempts(trace, rank)):
            assert index < 2, f"rank {rank} started more than twice"
            placed[index].add(by_node[run[0]["node_id"]])
    return placed[0], placed[1]


def _history(project: Path) -> list[dict]:
    with (project / "reports" / "digits" / "train_history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return [
        {"epoch": int(r["epoch"]), "world_size": int(r["world_size"]), "lr": float(r["lr"])}
        for r in rows
    ]


def _check_learning_rates(project: Path, rows: list[dict], resumed: int) -> None:
    """Each row's rate (the next step's) from the samples seen, computed here from the plan's
    arithmetic: whole global batches per epoch, the remainder skipped."""
    recipe = load_recipe("digits", project)
    train = recipe.train
    samples = split_info(project / "data" / "digits" / "shards", "train").samples
    seen = 0
    for row in rows:
        world = row["world_size"]
        size, steps = train_batches(samples, world, train.batch_size)
        seen += world * size * steps
        total = steps * EPOCHS
        position = round(seen / (world * size * steps) * steps)
        expected = scaled_lr(train.optimizer, world * train.batch_size) * lr_factor(
            position, total, 0, train.schedule
        )
        assert row["lr"] == pytest.approx(expected, rel=1e-5), (
            row,
            position,
            total,
        )  # CSV: 6 digits
    # ...which is not where counting epochs in the new world's steps would have put it.
    size, steps = train_batches(samples, 1, train.batch_size)
    first_alone = rows[resumed]
    by_epochs = scaled_lr(train.optimizer, train.batch_size) * lr_factor(
        (resumed + 1) * steps, steps * EPOCHS, 0, train.schedule
    )
    assert not math.isclose(first_alone["lr"], by_epochs, rel_tol=1e-3)


def _check_wandb(project: Path, rows: list[dict]) -> None:
    """One W&B run continued across both attempts: every epoch once, with its world size."""
    runs = sorted((project / "wandb").glob("offline-run-*/run-*.wandb"))
    records = [read_records(run) for run in runs]
    assert len({i for r in records for i in run_ids(r)}) == 1, runs
    logged = [row for r in records for row in history_rows(r) if "epoch" in row]
    assert sorted(row["epoch"] for row in logged) == list(range(1, EPOCHS + 1)), logged
    by_epoch = {row["epoch"]: row["train/world_size"] for row in logged}
    assert by_epoch == {row["epoch"]: row["world_size"] for row in rows}
