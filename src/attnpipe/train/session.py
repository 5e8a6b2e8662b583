"""What the training loop needs from its launcher: rank, device, DDP wrapping, checkpoints.

`RaySession` is the product path (Ray Train's TorchTrainer). `TorchrunSession` runs the very
same loop under plain `torchrun`: the baseline of the training benchmark, and a way to debug
the loop without Ray.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from attnpipe.devices import require_cuda, wants_gpu
from attnpipe.train.checkpoint_folders import CheckpointFolders
from attnpipe.train.stop import StopFlagReader


class WorkerSession(Protocol):
    rank: int
    world_size: int
    device: torch.device
    node_id: str

    def prepare_model(self, model: nn.Module, forward_sync_buffers: bool = True) -> nn.Module:
        """Move to the device and wrap for data parallelism (DDP) when there are several ranks;
        `forward_sync_buffers`: DDP copies rank 0's buffers to every rank before each forward
        (`ddp_options`)."""

    def latest_checkpoint(self) -> AbstractContextManager[Path | None]:
        """Context manager: the folder of the newest checkpoint of this run, or None."""

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        """End of an epoch on every rank (a barrier); rank 0 passes the checkpoint folder."""

    def stop_requested(self) -> bool:
        """This rank's view of whether the launcher asked the run to stop (ranks then agree)."""


def ddp_options(forward_sync_buffers: bool) -> dict[str, Any]:
    """DistributedDataParallel's keyword arguments, the same under Ray Train and torchrun.

    `forward_sync_buffers` is torch's name since 2.13: the old `broadcast_buffers` prints a
    FutureWarning from every rank, and when False it also skipped the copy of the buffers at
    start, which changes nothing here (every rank builds or loads the same ones).
    """
    return {"forward_sync_buffers": forward_sync_buffers}


class RaySession:
    def __init__(self, stop_name: str | None = None, use_gpu: bool = False) -> None:
        import ray
        import ray.train
        import ray.train.torch

        _quiet_ray_train_reports()
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        if use_gpu:
            # Ray gave this worker a GPU: train on it or fail saying why, never on the CPU.
            require_cuda(f"training worker {self.rank} was given a GPU")
        self.device = ray.train.torch.get_device()
        self.node_id = ray.get_runtime_context().get_node_id()
        # Polled by rank 0 only: the loop shares its answer with the other ranks.
        self._stop_flag = StopFlagReader(stop_name if self.rank == 0 else None)

    def prepare_model(self, model: nn.Module, forward_sync_buffers: bool = True) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs=ddp_options(forward_sync_buffers)
        )

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        # A private copy per rank: `as_directory()` shares one download folder between the
        # ranks of a node, which one rank may clean up while another still reads from it
        # (seen as a truncated checkpoint.pt on resume from S3).
        with tempfile.TemporaryDirectory(prefix="attnpipe-checkpoint-") as folder:
            checkpoint.to_directory(folder)
            yield Path(folder)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def stop_requested(self) -> bool:
        return self._stop_flag.requested()


def _quiet_ray_train_reports() -> None:
    """Silence Ray Train's INFO line per report and checkpoint; our epoch line says it once.

    Ray names that logger after its file path (`getLogger(__file__)`), outside `ray.train`,
    so RunConfig's LoggingConfig does not reach it.
    """
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as ray_context
    except ImportError:  # a Ray version that moved it: only the noise comes back
        return
    logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)


class TorchrunSession:
    """Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK; checkpoints are copied to `storage`
    whole or not at all, the newest `keep` kept (`CheckpointFolders`).

    `use_gpu`: the recipe's `train.use_gpu`; "auto" trains on this process's GPU whenever the
    machine has an NVIDIA GPU, and then, as with True, fails (saying why) if CUDA cannot start:
    never a silent CPU run.
    """

    def __init__(self, storage: Path, use_gpu: bool | str = "auto", keep: int = 2) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if wants_gpu(use_gpu):
            require_cuda(f"torchrun rank {self.rank}")
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.node_id = socket.gethostname()
        self.storage = storage
        self.checkpoints = CheckpointFolders(storage, keep)
        # torchrun passes its SIGTERM on to every worker: note it, the loop stops cleanly.
        self._stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: self._stop.set())

    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def prepare_model(self, model: nn.Module, forward_sync_buffers: bool = True) -> nn.Module:
        model = model.to(self.device)
        if self.world_size == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, **ddp_options(forward_sync_buffers)
        )

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        yield self.checkpoints.latest()

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None:
            self.checkpoints.add(checkpoint_dir)
        if self.world_size > 1:
            dist.barrier()
