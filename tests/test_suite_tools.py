"""The suite's own tools: the check counter (docs/testing.md's "nothing dropped" count), the
per-file time report, and the tier guard that keeps `make check` free of Ray, DVC and hosts."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import _executable
from tests.count_assertions import count_checks
from tests.durations import per_file


def test_count_checks_counts_asserts_and_pytest_raises_only():
    source = (
        "import pytest\n"
        "def test_a():\n"
        "    assert 1\n"
        "    with pytest.raises(ValueError):\n"
        "        int('x')\n"
        "    pytest.raises(KeyError, dict().__getitem__, 1)\n"
        "    raises = 0  # a name, not a check\n"
        "    assert raises == 0, 'message'\n"
    )
    assert count_checks(source) == 4


def test_durations_add_setup_call_and_teardown_per_file():
    report = (
        "12.50s setup    tests/a/test_x.py::test_one\n"
        "1.25s call     tests/a/test_x.py::test_one[param]\n"
        "0.25s teardown tests/b/test_y.py::test_two\n"
        "(40 durations < 0.005s hidden.)\n"
    )
    assert per_file(report) == {"tests/a/test_x.py": 13.75, "tests/b/test_y.py": 0.25}


def test_the_program_of_a_command_is_named_for_the_tier_guard():
    assert _executable(["/venv/bin/ray", "start", "--head"]) == "ray"
    assert _executable("dvc repro -f") == "dvc"
    assert _executable([b"/usr/sbin/ip", "netns", "add", "x"]) == "ip"
    assert _executable("") == ""


def test_an_unmarked_test_cannot_start_dvc_and_is_told_the_marker():
    with pytest.raises(RuntimeError, match=r"mark it @pytest\.mark\.dvc"):
        subprocess.run(["dvc", "--version"], capture_output=True)
    assert subprocess.run(["true"]).returncode == 0  # other programs start as usual


def test_data_pools_start_workers_from_a_fork_server_not_from_this_process():
    """A fork of this (threaded) process crashed a shard worker; pool workers must be children
    of the fork server instead."""
    import os

    from attnpipe.data.pools import process_pool

    with process_pool(1, "json") as pool:
        assert pool.submit(os.getppid).result() != os.getpid()
