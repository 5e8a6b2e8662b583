"""Training's use of `attnpipe.capacity`: the recipe's `train` section as a worker shape.

The decisions themselves (GPUs or not, whether the ranks fit, whether CUDA starts where they
run) live in `attnpipe.capacity`, shared with `evaluate --address`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from attnpipe import capacity
from attnpipe.config import TrainConfig


def worker_shape(train: TrainConfig) -> capacity.WorkerShape:
    """What each training rank asks the cluster for; refusals name the `train.*` keys."""
    return capacity.WorkerShape(
        use_gpu=train.use_gpu,
        cpus_per_worker=train.cpus_per_worker,
        gpus_per_worker=train.gpus_per_worker,
        sync_batchnorm=train.sync_batchnorm,
    )


def worker_resources(train: TrainConfig, use_gpu: bool) -> dict[str, float]:
    return capacity.worker_resources(worker_shape(train), use_gpu)


@contextmanager
def training_cluster(train: TrainConfig, workers: int, address: str | None) -> Iterator[bool]:
    """Connected to the cluster the ranks run on; yields whether they use GPUs (see
    `attnpipe.capacity.worker_cluster`)."""
    with capacity.worker_cluster(worker_shape(train), workers, address) as use_gpu:
        yield use_gpu
