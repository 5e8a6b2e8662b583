"""The quick tier's work units hold: `--dist loadgroup` keeps a group's tests in one process.

tests/conftest.py marks each test with the work unit it belongs to (`xdist_group`), so that a
shared build (`trained_project`, a file's module fixtures) is made by one of the two pytest
processes, once. pytest-xdist passes the group inside the test's node id; pytest 9.2 stopped
taking that change (pytest-dev/pytest-xdist#1386), and nothing failed: every build was simply made
twice (the report's model trained in both processes, 20 s each). This runs the same mechanism on
a small generated suite with the locked pytest and xdist.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

CONFTEST = """
import pytest

@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        shared = "shared_build" in getattr(item, "fixturenames", ())
        unit = "shared_build" if shared else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(unit))

@pytest.fixture(scope="session")
def shared_build():
    return 1
"""

SHARED_TESTS = "".join(f"def test_shared_{i}(shared_build):\n    pass\n\n" for i in range(4))
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
        "shared_build",
        "test_alone_a.py",
        "test_alone_b.py",
    }, f"tests ran outside their work units (pytest-dev/pytest-xdist#1386?): {dict(workers_of)}"
    assert all(len(workers) == 1 for workers in workers_of.values()), dict(workers_of)
