"""The quick tier's work units hold: `--dist loadgroup` keeps a group's tests in one process.

tests/conftest.py marks each test with the work unit it belongs to (`xdist_group`), so that a
shared build (`trained_project`, a file's module fixtures) is made by one of the two pytest
processes, once. pytest-xdist passes the group inside the test's node id; pytest 9.2 stopped
taking that change (pytest-dev/pytest-xdist#1386), and nothing failed: every build was simply made
twice (the report's model trained in both processes, 20 s each). This runs the suite's own
collection hook (tests/conftest.py) over a small generated suite, with the locked pytest and
xdist: two files share a build named as a real one, two others are units of their own.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from tests.conftest import REPO

# The generated suite's conftest: the project's hook (its tryfirst order included), and a session
# fixture named as one of the project's shared builds.
CONFTEST = """
import pytest
from tests.conftest import pytest_collection_modifyitems

@pytest.fixture(scope="session")
def trained_project():
    return 1
"""

SHARED_TESTS = "".join(f"def test_shared_{i}(trained_project):\n    pass\n\n" for i in range(4))
ALONE_TESTS = "".join(f"def test_alone_{i}():\n    pass\n\n" for i in range(4))


def test_a_work_units_tests_run_in_one_process(tmp_path: Path):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    for name in ("a", "b"):
        (tmp_path / f"test_shared_{name}.py").write_text(SHARED_TESTS)
        (tmp_path / f"test_alone_{name}.py").write_text(ALONE_TESTS)
    command = [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v"]
    done = subprocess.run(
        [*command, "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},  # `tests.conftest` importable there
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    workers_of = defaultdict(set)  # work unit -> the processes that ran its tests
    for worker, nodeid in re.findall(r"\[(gw\d)\] \[\s*\d+%\] PASSED (\S+)", done.stdout):
        unit = nodeid.rpartition("@")[2] if "@" in nodeid else f"(no unit: {nodeid})"
        workers_of[unit].add(worker)
    assert sum(1 for line in done.stdout.splitlines() if " PASSED " in line) == 16, done.stdout
    assert set(workers_of) == {
        "trained_project",
        "test_alone_a.py",
        "test_alone_b.py",
    }, f"tests ran outside their work units (tests/conftest.py, or xdist#1386): {dict(workers_of)}"
    assert all(len(workers) == 1 for workers in workers_of.values()), dict(workers_of)
