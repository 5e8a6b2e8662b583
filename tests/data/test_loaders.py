"""Loaders: every evaluation sample exactly once across ranks and workers; equal train batches;
persistent workers; the accelerator input path, run on the CPU."""

from __future__ import annotations

import itertools
import json
import multiprocessing
from collections import Counter

import pytest
import torch

from attnpipe.config import AugmentConfig
from attnpipe.data.loaders import (
    ShardStream,
    _DeviceBatches,
    _HostBatches,
    build_transform,
    make_loader,
    normalize_on_device,
    split_info,
    steps_per_epoch,
)


def _stream(recipe, urls, rank, world, train):
    """A stream given shard URLs (looked up in index.json), as callers used to build them."""
    return ShardStream(
        urls=urls,
        rank=rank,
        world_size=world,
        transform=build_transform(recipe.augment, 32, train=train),
        train=train,
        seed=0,
        shuffle_buffer=64,
    )


def _split_stream(recipe, paths, split, rank=0, world=1):
    train = split == "train"
    return ShardStream(
        split_info(paths.shards, split).shards,
        rank=rank,
        world_size=world,
        transform=build_transform(recipe.augment, 32, train=train),
        train=train,
        seed=0,
        shuffle_buffer=64,
    )


def _planned_ids(stream: ShardStream, workers: int, batch: int) -> list[str]:
    """The ids this rank's readers are dealt this epoch, read straight from the shards."""
    plan = stream.plan(workers, batch)
    return [
        json.loads(sample["json"])["id"]
        for worker in range(workers)
        for sample in stream.read(plan.segments(stream.rank, worker))
    ]


@pytest.mark.parametrize("shard_subset", [None, 3])  # 4 shards >= 4 slots, and 3 < 4 slots
def test_two_ranks_two_workers_see_every_eval_sample_once(digits_project, shard_subset):
    recipe, paths = digits_project
    info = split_info(paths.shards, "test")
    urls = info.urls[:shard_subset] if shard_subset else info.urls
    expected = sum(
        e["samples"]
        for e in __import__("json").loads((paths.shards / "index.json").read_text())["splits"][
            "test"
        ]["shards"][: shard_subset or None]
    )
    seen: Counter[str] = Counter()
    for rank in range(2):
        loader = make_loader(_stream(recipe, urls, rank, 2, train=False), batch_size=16, workers=2)
        for images, labels, ids in loader:
            assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
            assert len(labels) == len(ids)
            seen.update(ids)
    assert sum(seen.values()) == expected  # nothing missing ...
    assert max(seen.values()) == 1  # ... and nothing doubled


def test_train_gives_equal_batch_counts_and_disjoint_ranks(digits_project):
    recipe, paths = digits_project
    info = split_info(paths.shards, "train")
    batch, world = 32, 2
    steps = steps_per_epoch(info.samples, world, batch)
    per_rank: list[set[str]] = []
    for rank in range(world):
        stream = _stream(recipe, info.urls, rank, world, train=True)
        stream.set_epoch(0)
        loader = make_loader(stream, batch_size=batch, workers=2)
        batches = [b for _, b in zip(range(steps), loader, strict=False)]
        assert len(batches) == steps
        assert all(len(b[1]) == batch for b in batches)
        per_rank.append({i for b in batches for i in b[2]})
    assert not per_rank[0] & per_rank[1]


def test_train_order_changes_with_the_epoch(digits_project):
    recipe, paths = digits_project
    info = split_info(paths.shards, "train")
    orders = []
    for epoch in (0, 0, 1):
        stream = _stream(recipe, info.urls, 0, 1, train=True)
        stream.set_epoch(epoch)
        ids = [b[2] for _, b in zip(range(3), make_loader(stream, 16, 0), strict=False)]
        orders.append(ids)
    assert orders[0] == orders[1]  # reproducible
    assert orders[0] != orders[2]  # reshuffled per epoch


def test_fast_transform_matches_torchvision_bit_for_bit():
    """The loader's crop + flip + normalise equal torchvision v2's, from the same seed."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import v2

    from attnpipe.config import AugmentConfig

    augment = AugmentConfig(vertical_flip=0.5)
    reference = v2.Compose(
        [
            v2.RandomResizedCrop(
                24, augment.random_resized_crop_scale, augment.random_resized_crop_ratio
            ),
            v2.RandomHorizontalFlip(augment.horizontal_flip),
            v2.RandomVerticalFlip(augment.vertical_flip),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(augment.mean, augment.std),
        ]
    )
    ours = build_transform(augment, 24, train=True)
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    image = decode_jpeg(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8),
                        mode=ImageReadMode.RGB)  # fmt: skip
    assert not image.is_contiguous()  # channels-last, as decoded
    for seed in range(20):
        torch.manual_seed(seed)
        expected = reference(image)
        torch.manual_seed(seed)
        got = ours(image)
        assert got.shape == (3, 24, 24)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_loader_batches_equal_the_per_sample_transform(digits_project):
    """make_loader normalises whole batches in the main process: same numbers, same order."""
    recipe, paths = digits_project
    info = split_info(paths.shards, "val")
    stream = _stream(recipe, info.urls, 0, 1, train=False)
    direct = list(stream)  # per-sample: augment + normalise in one call
    batched = [b for b in make_loader(stream, batch_size=16, workers=2)]
    images = torch.cat([b[0] for b in batched])
    ids = [i for b in batched for i in b[2]]
    labels = torch.cat([b[1] for b in batched])
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert sorted(ids) == sorted(i for _, _, i in direct)
    by_id = {i: (image, label) for image, label, i in direct}
    for image, label, sample_id in zip(images, labels, ids, strict=True):
        torch.testing.assert_close(image, by_id[sample_id][0], rtol=0, atol=1e-6)
        assert int(label) == by_id[sample_id][1]


def test_float_batches_are_reused_only_once_nothing_refers_to_them():
    from attnpipe.data.loaders import FloatBatchPool

    shape = (8, 3, 224, 224)  # 4.8 MB: huge-page mappings
    pool = FloatBatchPool(keep=2)
    first = pool.get(shape)
    first.fill_(1.5)
    assert first.shape == shape and float(first.sum()) == 1.5 * first.numel()
    address = first.data_ptr()
    second = pool.get(shape)  # `first` is still held: a different buffer
    assert second.data_ptr() != address
    view = first[3]
    del first
    assert pool.get(shape).data_ptr() not in (address, second.data_ptr())  # a view holds it
    del view
    assert pool.get(shape).data_ptr() == address  # released: handed out again
    held = pool.get(shape)  # takes the first buffer again
    second_address = second.data_ptr()
    storage = second.untyped_storage()
    del second
    assert pool.get(shape).data_ptr() not in (address, second_address)  # storage alive
    del storage
    assert pool.get(shape).data_ptr() == second_address
    assert held.data_ptr() == address
    small = pool.get((2, 3, 4, 4))  # below 4 MB: a plain tensor, not a mapping
    assert small.shape == (2, 3, 4, 4) and small.data_ptr() not in (address, second_address)


def test_tar_reader_agrees_with_webdataset_on_long_and_unicode_names(tmp_path):
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    from attnpipe.data.loaders import iter_tar_samples

    path = tmp_path / "s.tar"
    keys = ["short", "x" * 150, "nested/dir/" + "y" * 120, "éléphant_ünïcode"]
    with open(path, "wb") as handle, wds.TarWriter(handle, mtime=0) as writer:
        for i, key in enumerate(keys):
            writer.write({"__key__": key, "jpg": bytes([i]) * (100 + 700 * i), "cls": b"%d" % i})
    ours = list(iter_tar_samples(str(path)))
    with open(path, "rb") as stream:
        theirs = list(group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}])))
    assert [s["__key__"] for s in ours] == keys
    assert [{k: v for k, v in s.items() if k != "__url__"} for s in ours] == [
        {k: v for k, v in s.items() if k != "__url__"} for s in theirs
    ]


def test_tar_reader_rejects_a_corrupt_shard(tmp_path):
    from attnpipe.data.loaders import ShardFormatError, iter_tar_samples

    path = tmp_path / "bad.tar"
    path.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(ShardFormatError, match="bad tar header"):
        list(iter_tar_samples(str(path)))
    good = tmp_path / "good.tar"
    import webdataset as wds

    with open(good, "wb") as handle, wds.TarWriter(handle, mtime=0) as writer:
        writer.write({"__key__": "a", "cls": b"1"})
    data = bytearray(good.read_bytes())
    data[0] ^= 1  # one flipped bit in the first header's name
    path.write_bytes(bytes(data))
    with pytest.raises(ShardFormatError, match="checksum"):
        list(iter_tar_samples(str(path)))
    for cut in (700, 1024):  # inside a member, and between members
        path.write_bytes(good.read_bytes()[:cut])
        with pytest.raises(ShardFormatError, match="truncated"):
            list(iter_tar_samples(str(path)))


def test_each_rank_loader_yields_exactly_its_batches_then_ends(digits_project):
    """3 ranks x 2 workers over 4 shards: every rank the same count of full batches, disjoint,
    fewer than one global batch skipped, a different deal the next epoch; then the loader ends."""
    recipe, paths = digits_project
    total = split_info(paths.shards, "train").samples
    batch, world = 32, 3
    steps = steps_per_epoch(total, world, batch)
    deals = []
    for epoch in (0, 1):
        seen: Counter[str] = Counter()
        for rank in range(world):
            stream = _split_stream(recipe, paths, "train", rank, world)
            stream.set_epoch(epoch)
            loader = make_loader(stream, batch, workers=2)
            batches = list(itertools.islice(loader, steps + 5))  # a stream that never ends fails
            assert len(batches) == steps == len(loader)
            assert all(len(labels) == batch == len(ids) for _, labels, ids in batches)
            seen.update(i for _, _, ids in batches for i in ids)
        assert max(seen.values()) == 1
        assert total - world * batch < sum(seen.values()) == world * steps * batch
        deals.append(set(seen))
    assert deals[0] != deals[1]


def _two_epochs(stream: ShardStream, persistent: bool) -> tuple[list, list]:
    """Ids and the DataLoader worker processes seen in epochs 0 and 1 of one loader."""
    loader = make_loader(stream, 32, workers=2, persistent=persistent)
    ids_by_epoch, workers_by_epoch = [], []
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        ids, pids = [], set()
        for _, _, batch_ids in loader:
            ids += batch_ids
            pids |= {child.pid for child in multiprocessing.active_children()}
        ids_by_epoch.append(ids)
        workers_by_epoch.append(pids)
        assert sorted(ids) == sorted(_planned_ids(stream, 2, 32))  # this epoch's deal
    return ids_by_epoch, workers_by_epoch


def test_persistent_workers_serve_every_epoch_with_that_epochs_plan(digits_project):
    recipe, paths = digits_project
    stream = _split_stream(recipe, paths, "train")
    ids, workers = _two_epochs(stream, persistent=True)
    assert len(workers[0]) == 2 and workers[0] == workers[1]  # the same two processes
    assert ids[0] != ids[1]  # ... and they read epoch 1's deal, not epoch 0's again
    _, fresh = _two_epochs(stream, persistent=False)
    assert len(fresh[0]) == 2 and not fresh[0] & fresh[1]  # without: new processes per epoch


def test_a_split_smaller_than_a_global_batch_gives_each_rank_one_smaller_batch(digits_project):
    recipe, paths = digits_project
    total = split_info(paths.shards, "val").samples  # 179
    sizes = []
    for rank in range(2):
        stream = ShardStream(
            split_info(paths.shards, "val").shards,
            rank=rank,
            world_size=2,
            transform=build_transform(recipe.augment, 32, train=True),
            train=True,
        )
        batches = list(make_loader(stream, 128, workers=2))
        sizes.append([len(labels) for _, labels, _ in batches])
    assert sizes == [[total // 2], [total // 2]]


def test_normalize_on_device_equals_the_cpu_path():
    transform = build_transform(AugmentConfig(), 32, train=False)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    expected = transform.normalize(images)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        got = normalize_on_device(images, transform, torch.device("cpu"), memory_format)
        assert got.dtype == torch.float32 and got.is_contiguous(memory_format=memory_format)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_device_path_gives_the_host_paths_batches(digits_project, memory_format):
    """The accelerator path's code (side stream, one batch ahead), run with CPU streams."""
    recipe, paths = digits_project
    loader = make_loader(
        _split_stream(recipe, paths, "val"), 16, workers=2, memory_format=memory_format
    )
    assert isinstance(loader.to_device, _HostBatches)
    host = [(x.clone(), y, i) for x, y, i in loader]
    transform = loader.stream.transform
    device = _DeviceBatches(transform, torch.device("cpu"), memory_format)
    on_device = list(device(loader.dataloader))
    assert len(on_device) == len(host) == len(loader)
    for (x, y, ids), (dx, dy, dids) in zip(host, on_device, strict=True):
        assert x.is_contiguous(memory_format=memory_format)
        assert dx.is_contiguous(memory_format=memory_format)
        assert torch.equal(x, dx) and torch.equal(y, dy) and ids == dids
        assert dy.dtype == torch.int64


def test_the_device_decides_the_input_path_and_cuda_never_falls_back(digits_project):
    recipe, paths = digits_project
    stream = _split_stream(recipe, paths, "val")
    cpu = make_loader(stream, 16, workers=2)
    assert not cpu.dataloader.pin_memory and isinstance(cpu.to_device, _HostBatches)
    cuda = make_loader(stream, 16, workers=2, device=torch.device("cuda"))
    assert cuda.dataloader.pin_memory and isinstance(cuda.to_device, _DeviceBatches)
    assert cuda.dataloader.persistent_workers is False
    if torch.cuda.is_available():
        images, labels, _ = next(iter(cuda))
        assert images.device.type == labels.device.type == "cuda"
    else:
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            next(iter(cuda))
    with pytest.raises(ValueError, match="mps is not supported"):
        make_loader(stream, 16, device="mps")


def test_single_process_batches_in_reused_memory_are_never_overwritten_while_held(
    digits_project,
):
    """workers=0 stacks uint8 batches into reused huge-page memory (10 MB batches at 224)."""
    recipe, paths = digits_project
    stream = ShardStream(
        split_info(paths.shards, "val").shards,
        rank=0,
        world_size=1,
        transform=build_transform(recipe.augment, 224, train=False),
        train=False,
    )
    expected = {i: stream.transform.augment(image) for image, _, i in stream.samples(False)}
    loader = make_loader(stream, 64, workers=0)
    held = list(loader.dataloader)  # every uint8 batch kept alive at once
    assert held[0][0].nbytes > 4 << 20 and held[0][0].dtype == torch.uint8
    assert len({images.data_ptr() for images, _, _ in held}) == len(held)
    for images, labels, ids in held:
        assert labels.dtype == torch.int64 and isinstance(ids, list)
        for image, sample_id in zip(images, ids, strict=True):
            assert torch.equal(image, expected[sample_id])
    released = [images.data_ptr() for images, _, _ in held]
    del held, images, image
    assert next(iter(loader.dataloader))[0].data_ptr() in released  # reused once let go
