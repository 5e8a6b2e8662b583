"""Run the model tests single-threaded.

The CI/dev machine is a shared 2-core box: when other jobs load it, two OpenMP threads spin-wait
on each other and small-tensor tests slow down ~10x, while one thread degrades gracefully. The
previous setting is restored after the module.
"""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
