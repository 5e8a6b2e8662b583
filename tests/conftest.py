"""Shared fixtures: a tiny digits project on disk, built once per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from attnpipe.config import Recipe, load_recipe
from attnpipe.paths import PipelinePaths

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Private clusters start lean: the dashboard is a process and an agent per node, seconds of CPU
# per cluster, and only the Jobs API needs it (the tests that submit jobs start their own head).
os.environ.setdefault("ATTNPIPE_RAY_DASHBOARD", "0")
# Ray Train's controller looks at its workers every 2 s: on average a second after a run's
# last step (and after a worker dies) is spent waiting for it. The suite's ~30 runs are
# seconds long; a look every 0.5 s costs a few remote calls.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Nothing is downloaded in tests: ImageNet weights must come from a cache the test filled.
os.environ["ATTNPIPE_OFFLINE"] = "1"

# Small enough for two CPU cores in seconds; the same code path as the demo. 16 pixels: the
# digits are 8 x 8 scans, and a quarter of the demo's pixels trains 2.2x as fast and better.
TINY_OVERRIDES = {
    "model": {"name": "attention56_cifar", "input_size": 16, "kwargs": {"width_multiplier": 0.25}},
    "train": {
        "workers": 2,
        "epochs": 3,
        "batch_size": 32,
        # Converges in the ~60 steps three tiny epochs give; SGD's warmup needs more.
        "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0001},
        "schedule": {"name": "constant"},
        "max_failures": 1,
    },
}


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the block. Its threads spin-wait: on a shared 2-core
    machine one thread per process is many times faster than two (small tensors), and on an
    idle one it costs little at the tests' sizes."""
    import torch  # here: the conftest of every test process need not import it

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- test tiers
# `make check` runs the tests that need none of these; `make test` runs every test. A test
# without the marker fails when it starts such a process (`forbid_tier_processes`).
TIERS = {
    "ray": "starts Ray or a training launcher (a cluster here or in a child, a Ray job, torchrun)",
    "dvc": "runs DVC in a git repository",
    "netns": "makes test hosts in network namespaces (needs root and `ip`)",
}
# Executables that only a marked test may start: (names, the marker that allows them).
TIER_EXECUTABLES = (
    (frozenset({"gcs_server", "raylet", "ray"}), "ray"),
    (frozenset({"dvc"}), "dvc"),
    (frozenset({"ip"}), "netns"),
)


# `make test` runs the rest of the quick tier beside the marked tiers at idle priority
# (SCHED_IDLE): it gets a core only when they leave one free, and can wait minutes for it. A
# test that waits on the wall clock (a deadline, a collective's timeout, elapsed time asserted)
# carries `timing`: make test runs it in the foreground, with the marked tiers.
TIMING = "waits on the wall clock (a deadline, a collective's timeout): never at idle priority"


def pytest_configure(config: pytest.Config) -> None:
    for name, what in TIERS.items():
        config.addinivalue_line("markers", f"{name}: {what} (make check leaves it out)")
    config.addinivalue_line("markers", f"timing: {TIMING}")


# Shared fixtures that start those processes: a test using one carries its markers.
FIXTURE_TIERS = {"repro_project": ("dvc", "ray")}


# The quick tier (`make check`, and `make test`'s part beside the marked tiers) runs in two
# pytest processes (`-n 2 --dist loadgroup`), each given whole work units: a file's tests (its
# module fixtures are built once), except that the tests of a shared session build are one
# unit, so that one process builds it. The longest units start first, so that the short ones
# fill the end of both processes' time. (The marked tiers run one test at a time: their order
# costs nothing.)
SHARED_BUILDS = ("repro_project", "trained_project")  # a unit each, named after the fixture
LONGEST_UNITS = (  # the quick tier's, longest first (docs/testing.md)
    "trained_project",
    "tests/models/test_models.py",
    "tests/train/test_loop_costs.py",
    "tests/train/test_mid_epoch.py",
    "tests/data/test_prepare_shard.py",
)


def _work_unit(item: pytest.Item) -> str:
    uses = getattr(item, "fixturenames", ())
    return next((build for build in SHARED_BUILDS if build in uses), item.nodeid.split("::")[0])


def _start_rank(item: pytest.Item) -> int:
    unit = _work_unit(item)
    return LONGEST_UNITS.index(unit) if unit in LONGEST_UNITS else len(LONGEST_UNITS)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, tiers in FIXTURE_TIERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                for tier in tiers:
                    item.add_marker(tier)
        item.add_marker(pytest.mark.xdist_group(_work_unit(item)))
    items.sort(key=_start_rank)  # stable: a unit's tests keep their order


def _executable(args: object) -> str:
    """The program a Popen call starts: the first word of a command line, or of argv."""
    if isinstance(args, (str, bytes, os.PathLike)):
        first = next(iter(os.fsdecode(args).split()), "")
    else:
        first = os.fsdecode(next(iter(args), ""))  # type: ignore[call-overload]
    return Path(first).name


@pytest.fixture(autouse=True)
def forbid_tier_processes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """An unmarked test that starts Ray, DVC or `ip` fails, naming the marker it needs: so
    `make check` (no marked test) never starts them, and a marker cannot be forgotten."""
    allowed = {name for name in TIERS if request.node.get_closest_marker(name)}
    if allowed == set(TIERS):
        yield
        return
    original = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        executable = _executable(args)
        for names, tier in TIER_EXECUTABLES:
            if executable in names and tier not in allowed:
                raise RuntimeError(
                    f"this test starts `{executable}`: mark it @pytest.mark.{tier} "
                    f"({TIERS[tier]}); `make check` leaves such tests out"
                )
        original(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
    yield


# --------------------------------------------------------------------------- test hosts
# `netns` tests need root and iproute2's `ip`; where either is missing they are skipped, saying
# which (a machine that has both but cannot make namespaces still fails them, loudly).
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("netns") is not None:
        from tests.netns import missing_requirement

        if (missing := missing_requirement()) is not None:
            pytest.skip(f"needs root and `ip` for test hosts in network namespaces: {missing}")


def write_project(root: Path, overrides: dict | None = None, name: str = "digits") -> Path:
    """Copy the repository's pipeline files into `root`, with recipe overrides merged in.

    The package source and uv.lock come along: dvc.yaml lists them as the stages' code.
    """
    for item in ("dvc.yaml", "params.yaml", "pipelines", ".dvcignore", "uv.lock", "src"):
        source = REPO / item
        if source.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(source, root / item, dirs_exist_ok=True, ignore=ignore)
        elif source.exists():
            shutil.copy(source, root / item)
    recipe_path = root / "pipelines" / f"{name}.yaml"
    data = yaml.safe_load(recipe_path.read_text())
    for section, values in (overrides or {}).items():
        data[section] = {**data.get(section, {}), **values}
    recipe_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return root


@pytest.fixture(scope="session")
def digits_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Recipe, PipelinePaths]:
    """fetch + prepare + shard of the digits, done once (in-process) and shared read-only."""
    from attnpipe.data.prepare import prepare
    from attnpipe.data.shard import shard
    from attnpipe.data.sources import fetch

    root = write_project(tmp_path_factory.mktemp("digits"), TINY_OVERRIDES)
    recipe = load_recipe("digits", root)
    paths = PipelinePaths(root, "digits")
    fetch(recipe, paths.raw)
    prepare(recipe, paths, progress=False)
    shard(recipe, paths, progress=False)
    return recipe, paths


# --------------------------------------------------------------------------- dvc repro, once

GIT_ID = {
    "GIT_AUTHOR_NAME": "attnpipe tests",
    "GIT_AUTHOR_EMAIL": "tests@attnpipe.invalid",
    "GIT_COMMITTER_NAME": "attnpipe tests",
    "GIT_COMMITTER_EMAIL": "tests@attnpipe.invalid",
}
# Planted in the environment of `dvc repro`: it must not appear in any file the pipeline writes.
SECRET = "attnpipe-test-secret-7f3a9c"


def run_in(
    root: Path, *command: str, env: dict[str, str] | None = None, unset: tuple[str, ...] = ()
) -> str:
    """Run a command (dvc, git, attnpipe) in `root` with the venv first on PATH; its output.

    `env` adds variables, `unset` removes some of this process's.
    """
    full_env = {
        **os.environ,
        **GIT_ID,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "WANDB_MODE": "offline",
        **(env or {}),
    }
    for name in unset:
        full_env.pop(name, None)
    done = subprocess.run(command, cwd=root, env=full_env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{output[-4000:]}"
    return output


def stages_run(dvc_output: str) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` ran, from its "Running stage 'x'" lines."""
    return {
        line.split("'")[1] for line in dvc_output.splitlines() if line.startswith("Running stage")
    }


@dataclass(frozen=True)
class ReproProject:
    """The digits pipeline built by `dvc repro` in a fresh git repository (tiny settings)."""

    root: Path
    output: str  # what `dvc repro` printed
    trace: Path  # ATTNPIPE_TRACE_DIR of its training stage


@pytest.fixture(scope="session")
def repro_project(tmp_path_factory: pytest.TempPathFactory) -> ReproProject:
    """Built once and shared read-only: the e2e tests check the pipeline, the DDP tests its run.

    Tests that change the project (an experiment, a push) work on a copy.
    """
    root = write_project(tmp_path_factory.mktemp("dvcproject"), TINY_OVERRIDES)
    trace = root.parent / "trace"
    (root / ".gitignore").write_text("wandb/\n")
    run_in(root, "git", "init", "-q")
    run_in(root, "dvc", "init", "-q")
    # The project's DVC settings, as `make demo` has them (hardlinked cache, no analytics).
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    run_in(root, "git", "add", "-A")
    run_in(root, "git", "commit", "-q", "-m", "pipeline")
    secrets = {name: SECRET for name in ("WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "KAGGLE_KEY")}
    # As `make demo` runs it: the private cluster with its dashboard (the product's default).
    output = run_in(
        root,
        "dvc",
        "repro",
        env={"ATTNPIPE_TRACE_DIR": str(trace), **secrets},
        unset=("ATTNPIPE_RAY_DASHBOARD",),
    )
    return ReproProject(root, output, trace)


# --------------------------------------------------------------------------- S3 on loopback
@dataclass(frozen=True)
class S3Bucket:
    """A bucket on the test's moto server, and the environment that reaches it."""

    name: str
    endpoint: str
    env: dict[str, str]

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.name}", *parts])


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A real S3 API (moto's server) on 127.0.0.1 and a free port, for the whole session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a log record per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A fresh bucket; AWS_* point this process (and what it starts) at the moto server."""
    return make_s3_bucket(moto_endpoint, monkeypatch)


def make_s3_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """`s3_bucket` for any scope: a module's fixture passes a `pytest.MonkeyPatch.context()`."""
    import boto3

    env = {
        "AWS_ACCESS_KEY_ID": "attnpipe-test-key-id",
        "AWS_SECRET_ACCESS_KEY": f"attnpipe-test-secret-{uuid.uuid4().hex[:8]}",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_endpoint,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    bucket = f"attnpipe-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    return S3Bucket(bucket, moto_endpoint, env)
