"""Run the model tests single-threaded (`tests.conftest.one_thread` says why), restoring the
setting after the module."""

from collections.abc import Iterator

import pytest

from tests.conftest import one_thread


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield
