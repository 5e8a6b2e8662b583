"""Ray Train's entry point, apart from the loop it starts.

The driver and Ray Train's controller unpickle the function they are given, which imports its
module there. Importing the loop (the models, torchvision, the loaders, matplotlib) would cost
each of them about 4 s of CPU per run for code that only the workers run.
"""

from __future__ import annotations

from typing import Any


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One call per worker: the loop of `attnpipe.train.loop`, imported here, in the worker."""
    from attnpipe.train.loop import train_loop_per_worker as run_worker

    run_worker(config)
