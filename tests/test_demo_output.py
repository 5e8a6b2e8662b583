"""What `make demo` prints: no warning, no traceback, a `dvc metrics show` table one can read.

In-process checks of the causes (no Ray cluster, no DVC run); the real `dvc repro` and
`dvc metrics show` are asserted on in tests/e2e/test_dvc_pipeline.py.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import types
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import yaml
from torch import nn

from attnpipe import raycluster
from attnpipe.data.prepare import SPLITS, data_report, write_data_report
from attnpipe.paths import PipelinePaths
from attnpipe.train.session import RaySession, TorchrunSession, ddp_options
from tests.conftest import REPO


def _stage(name: str) -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][name]["do"]


def _declared(entries: list) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


def test_prepare_declares_only_totals_as_metrics_and_keeps_the_class_counts(tmp_path):
    """A column per class and split made `dvc metrics show` 1,000+ characters wide on digits."""
    prepare = _stage("prepare")
    assert _declared(prepare["metrics"]) == {"reports/${item}/data.json"}
    assert "reports/${item}/class_counts.csv" in _declared(prepare["outs"])
    classes = [f"class{i:04d}" for i in range(1000)]  # ImageNet's count
    samples = [SimpleNamespace(label=i % len(classes)) for i in range(3000)]
    splits = [SPLITS[i % 3] for i in range(3000)]
    paths = PipelinePaths(tmp_path, "many")
    write_data_report(paths, data_report(samples, splits, classes, rejected=2, duplicates=1))
    totals = json.loads(paths.data_report.read_text())
    samples_per_split = {"train": 1000, "val": 1000, "test": 1000}
    assert totals == {"samples": samples_per_split, "rejected": 2, "duplicates": 1}
    with paths.class_counts.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["class"] for row in rows] == classes
    assert sum(int(row[split]) for row in rows for split in SPLITS) == 3000


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank, so that DistributedDataParallel can be built here."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("forward_sync_buffers", [True, False])
def test_ddp_is_built_without_deprecated_arguments(one_rank_group, forward_sync_buffers):
    """torch 2.13 deprecated `broadcast_buffers`: its FutureWarning came from every rank."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    session = TorchrunSession.__new__(TorchrunSession)  # its torchrun environment is not needed
    session.world_size, session.device = 2, torch.device("cpu")  # so that it wraps in DDP
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped = session.prepare_model(model, forward_sync_buffers=forward_sync_buffers)
    assert isinstance(wrapped, nn.parallel.DistributedDataParallel)
    assert wrapped.forward_sync_buffers is forward_sync_buffers


def test_ray_train_gets_the_same_ddp_arguments(monkeypatch):
    """Ray Train's `prepare_model` hands `parallel_strategy_kwargs` to DDP as they are."""
    asked: list[dict] = []
    fake_torch = types.ModuleType("ray.train.torch")
    fake_torch.prepare_model = lambda model, **kwargs: asked.append(kwargs) or model
    fake_train = types.ModuleType("ray.train")
    fake_train.torch = fake_torch
    fake_ray = types.ModuleType("ray")
    fake_ray.train = fake_train
    for name, module in (("ray", fake_ray), ("ray.train", fake_train)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "ray.train.torch", fake_torch)
    RaySession.__new__(RaySession).prepare_model(nn.Linear(2, 2), forward_sync_buffers=False)
    assert asked == [{"parallel_strategy_kwargs": ddp_options(False)}]


def test_a_private_cluster_tells_its_processes_where_its_own_dashboard_is(monkeypatch):
    """Ray Train's placement-group cleaner asks the State API by scanning the machine for "the"
    cluster; with another cluster running it failed with a traceback every run. The processes
    Ray starts inherit the environment that `ray.init` sees."""
    started: list[dict] = []

    def init(**kwargs):
        started.append({**kwargs, "env": os.environ.get(raycluster.API_SERVER_ENV)})
        if len(started) == 1:  # the chosen port was taken meanwhile: another one is chosen
            port = kwargs["dashboard_port"]
            raise ValueError(f"Failed to bind to 127.0.0.1:{port} because it's already occupied.")

    fake_raylet = types.ModuleType("ray._raylet")
    fake_raylet.Config = SimpleNamespace(initialize=lambda text: None)
    fake_ray = types.ModuleType("ray")
    fake_ray.init, fake_ray.is_initialized = init, lambda: False
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setitem(sys.modules, "ray._raylet", fake_raylet)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(raycluster.API_SERVER_ENV, raising=False)
    # Recorded first, so that the variables are put back as they were after the test.
    monkeypatch.setenv(raycluster.AUTH_MODE_ENV, "unset")
    monkeypatch.delenv(raycluster.AUTH_MODE_ENV)
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    assert raycluster.connect_ray(None) is True
    assert len(started) == 2 and started[0]["dashboard_port"] != started[1]["dashboard_port"]
    final = started[-1]
    assert final["address"] == "local" and final["dashboard_host"] == "127.0.0.1"
    assert final["env"] == f"http://127.0.0.1:{final['dashboard_port']}"
    assert raycluster.API_SERVER_ENV not in os.environ  # this process's is as it was
    # Ray's default, chosen explicitly: Ray then does not warn about it on every start.
    assert os.environ[raycluster.AUTH_MODE_ENV] == "token"


def test_an_existing_cluster_is_joined_as_it_is(monkeypatch):
    joined: list[dict] = []
    fake_ray = types.ModuleType("ray")
    fake_ray.init, fake_ray.is_initialized = lambda **kw: joined.append(kw), lambda: False
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setattr(raycluster, "check_reachable", lambda address: None)
    monkeypatch.delenv(raycluster.AUTH_MODE_ENV, raising=False)
    assert raycluster.connect_ray("10.0.0.5:6379") is True
    assert joined == [{"address": "10.0.0.5:6379", "log_to_driver": True}]
    assert raycluster.AUTH_MODE_ENV not in os.environ  # the cluster's own choice stands


def test_write_data_report_replaces_a_linked_copy(tmp_path):
    """Like every output prepare writes, the CSV is a new file, never a write into DVC's
    cached copy that a previous `dvc repro` may have linked in its place."""
    paths = PipelinePaths(tmp_path, "linked")
    paths.reports.mkdir(parents=True)
    cached = tmp_path / "cache-copy"
    cached.write_text("class,train,val,test\n")
    os.link(cached, paths.class_counts)
    report = data_report([SimpleNamespace(label=0)], ["train"], ["only"], 0, 0)
    write_data_report(paths, report)
    assert cached.read_text() == "class,train,val,test\n"
    assert Path(paths.class_counts).read_text().splitlines()[1] == "only,1,0,0"
