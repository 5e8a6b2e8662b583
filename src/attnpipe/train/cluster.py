"""Training's use of `attnpipe.capacity`: the recipe's `train` section as a worker shape.

The decisions themselves (GPUs or not, whether the ranks fit, whether CUDA starts where they
run) live in `attnpipe.capacity`, shared with `evaluate --address`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

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


def trial_shape(train: TrainConfig) -> capacity.WorkerShape:
    """A tune trial's ranks (`train` holds the sweep's per-trial resources): refusals name
    the `tune.*` keys that set them."""
    return replace(
        worker_shape(train),
        section="tune",
        workers_key="tune.workers_per_trial",
        workers_auto=False,
    )


@contextmanager
def training_cluster(
    train: TrainConfig,
    address: str | None,
    announce: capacity.Announce = None,
    shape: capacity.WorkerShape | None = None,
) -> Iterator[capacity.WorkerPlan]:
    """Connected to the cluster the ranks run on; yields how many start (`train.workers`:
    auto counted, an elastic range kept) and whether they use GPUs (see
    `attnpipe.capacity.worker_plan_cluster`). `shape`: default `worker_shape(train)`."""
    shape = shape or worker_shape(train)
    with capacity.worker_plan_cluster(shape, train.workers, address, announce) as plan:
        yield plan
