"""Batches from the loader's workers to the model: reused huge-page host buffers, collation,
and normalisation on the CPU or (pinned, on a side stream) on the GPU."""

from __future__ import annotations

import copy
import math
import mmap
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate, get_worker_info

from attnpipe.data.transforms import ImageTransform


class FloatBatchPool:
    """Batch tensors (float32 unless asked) that are cheap to fill: huge pages, reused once
    released.

    A fresh 40 MB batch costs ten thousand page faults, which on a virtual machine cost more
    than normalising the images. Each batch here lives in an anonymous mapping advised to use
    2 MB (transparent huge) pages, and a mapping is handed out again only when no tensor,
    view or storage refers to it any more (the mapping's reference count says so: tensors
    made by `torch.frombuffer` hold it until their storage dies), so a batch the caller still
    holds is never overwritten.
    """

    SMALL = 4 << 20  # below this, torch's allocator (malloc) reuses memory well enough

    def __init__(self, keep: int = 4):
        self.keep = keep
        self.regions: list[mmap.mmap] = []

    def get(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = tuple(shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self.SMALL or not hasattr(mmap, "MADV_HUGEPAGE"):
            return torch.empty(shape, dtype=dtype)
        region = self._free_region(nbytes)
        if region is None:
            region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            region.madvise(mmap.MADV_HUGEPAGE)
            self._remember(region)
        return torch.frombuffer(region, dtype=dtype).view(shape)

    def __getstate__(self) -> dict:
        return {"keep": self.keep, "regions": []}  # mappings are this process's own

    def _free_region(self, nbytes: int) -> mmap.mmap | None:
        for region in self.regions:
            # Referenced by the list, `region` and getrefcount's argument: nothing else.
            if len(region) == nbytes and sys.getrefcount(region) <= 3:
                return region
        return None

    def _remember(self, region: mmap.mmap) -> None:
        if len(self.regions) < self.keep:
            self.regions.append(region)
            return
        for i, old in enumerate(self.regions):  # replace a released one of another size
            if sys.getrefcount(old) <= 3:
                self.regions[i] = region
                return


Batch = tuple[torch.Tensor, torch.Tensor, list[str]]


class _Collate:
    """(image, label, id) samples -> (uint8 images, int64 labels, ids), as `default_collate`.

    Read in this process (workers=0), the images are stacked into reused huge-page memory: a
    fresh 10 MB uint8 batch per step costs its page faults again, about 2% of the loader's
    time. DataLoader workers collate as torch does (straight into shared memory).
    """

    def __init__(self) -> None:
        self.pool = FloatBatchPool()

    def __call__(self, samples: list[tuple]) -> Batch:
        if get_worker_info() is not None:
            return default_collate(samples)
        images, labels, ids = zip(*samples, strict=True)
        shape = (len(images), *images[0].shape)
        out = torch.stack(images, out=self.pool.get(shape, images[0].dtype))
        return out, torch.tensor(labels, dtype=torch.int64), list(ids)


def normalize_on_device(
    images: torch.Tensor,
    transform: ImageTransform,
    device: torch.device | str,
    memory_format: torch.memory_format = torch.contiguous_format,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 batch (N, C, H, W) -> normalised float32 on `device`, in `memory_format`.

    The GPU input path's arithmetic (x / 255 -> (x - mean) / std as one multiply and one add,
    as `ImageTransform.normalize` does on the CPU: the same float32 values). `images` may be on
    the host (pinned: the copy does not block) or already on `device`; `out` is written when
    given (allocated by the caller on the stream that will use it).
    """
    device = torch.device(device)
    if out is None:
        out = torch.empty(
            images.shape, dtype=torch.float32, device=device, memory_format=memory_format
        )
    staged = images.to(device, non_blocking=True)
    scale = transform.scale.to(device, non_blocking=True)
    shift = transform.shift.to(device, non_blocking=True)
    return out.copy_(staged).mul_(scale).add_(shift)


class _HostBatches:
    """The CPU path: uint8 batches normalised in this process into reused huge-page buffers
    (one pool for every epoch: fresh buffers would cost their page faults again)."""

    def __init__(self, transform: ImageTransform, memory_format: torch.memory_format):
        self.transform, self.memory_format = transform, memory_format
        self.pool = FloatBatchPool()

    def __call__(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        for images, labels, ids in batches:
            out = self.transform.normalize(images, out=self.pool.get(images.shape))
            if self.memory_format != torch.contiguous_format:
                out = out.contiguous(memory_format=self.memory_format)
            yield out, labels, ids


class _DeviceBatches:
    """The accelerator path: pinned uint8 batches copied without blocking and normalised on the
    device, on a side stream one batch ahead, so that batch k+1's copy overlaps batch k's use.

    Written against the device module's stream API (`torch.cuda`, or `torch.cpu`, whose streams
    are no-ops, which is how it runs in tests). Outputs are allocated on the consumer's stream
    before the side stream waits for it, and the staging tensors live until the consumer has
    waited for the side stream's event, so the caching allocator never hands their memory to
    the consumer while a copy into it may still be running.
    """

    def __init__(
        self, transform: ImageTransform, device: torch.device, memory_format: torch.memory_format
    ):
        self.transform, self.device, self.memory_format = transform, device, memory_format

    def __call__(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        streams = torch.get_device_module(self.device)
        main = streams.current_stream(self.device)
        side = streams.Stream(self.device) if self.device.type == "cuda" else streams.Stream()
        on_device = copy.copy(self.transform)  # mean and std moved once, not per batch
        on_device.scale = self.transform.scale.to(self.device)
        on_device.shift = self.transform.shift.to(self.device)
        pending = None
        for batch in batches:
            started = self._start(batch, on_device, streams, main, side)
            if pending is not None:
                yield self._finish(pending, main)
            pending = started
        if pending is not None:
            yield self._finish(pending, main)

    def _start(
        self, batch: Batch, transform: ImageTransform, streams: Any, main: Any, side: Any
    ) -> tuple:
        images, labels, ids = batch
        out = torch.empty(
            images.shape, dtype=torch.float32, device=self.device, memory_format=self.memory_format
        )
        staged = torch.empty(images.shape, dtype=torch.uint8, device=self.device)
        labels_out = torch.empty(labels.shape, dtype=torch.int64, device=self.device)
        side.wait_stream(main)  # the memory just allocated may still be in use there
        with streams.stream(side):
            staged.copy_(images, non_blocking=True)
            labels_out.copy_(labels, non_blocking=True)
            normalize_on_device(staged, transform, self.device, self.memory_format, out)
        done = side.record_event()
        return out, labels_out, ids, done, (staged, images, labels)

    @staticmethod
    def _finish(pending: tuple, main: Any) -> Batch:
        out, labels, ids, done, _ = pending
        main.wait_event(done)
        return out, labels, ids
