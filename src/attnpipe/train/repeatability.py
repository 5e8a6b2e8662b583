"""`train.deterministic`: the switches that make two runs of one recipe give the same weights.

On CPUs the loop is repeatable without them (seeded generators, a fixed shard plan, one
thread order per op); on GPUs cuDNN's autotuner (`benchmark`) picks algorithms by timing and
several kernels add with atomics, so runs differ in the last bits and then more. With the
switch: cuDNN deterministic and not benchmarking, `torch.use_deterministic_algorithms`,
cuBLAS's fixed workspace (`CUBLAS_WORKSPACE_CONFIG`, read when cuBLAS starts: set before the
first CUDA matmul). Augmentation needs no switch: each training sample's random numbers come
from a seed of its own, a function of (seed, epoch, rank, reader, the sample's place), in
every attempt of a run (`attnpipe.data.loaders`).

A few CUDA backward kernels have no deterministic version (bilinear upsampling in the attention
masks, adaptive average pooling): torch warns once about each and they stay as they are
(`warn_only`), rather than refusing to train.
"""

from __future__ import annotations

import os

import torch

# cuBLAS: a fixed workspace per stream, so its reductions keep one order (CUDA >= 10.2).
CUBLAS_WORKSPACE = ":4096:8"


def apply_determinism(enabled: bool) -> None:
    """Turn the repeatable-run switches on (before the model touches the GPU) or leave them."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def loader_generator(seed: int, rank: int) -> torch.Generator:
    """The generator DataLoader draws its workers' base seed from: fixed by (seed, rank), not by
    whatever the main process drew before."""
    return torch.Generator().manual_seed(seed * 1009 + rank)
