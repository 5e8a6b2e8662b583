"""Reader plans and the readers themselves, on real tiny shards (32x32 PNGs, 5-30 per shard).

Each reader (rank, DataLoader worker) must read only its share of the bytes, every training
sample at most once per epoch with fewer than world_size x batch_size skipped, and every
evaluation sample exactly once, for any number of shards against any number of readers.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import attnpipe.data.loaders as loaders
from attnpipe import storage
from attnpipe.config import AugmentConfig
from attnpipe.data.loaders import (
    ShardFormatError,
    ShardStream,
    build_transform,
    plan_readers,
    split_info,
    steps_per_epoch,
)
from attnpipe.data.shard import ShardJob, build_index, publish_shards, write_shard

CLASSES = ["a", "b", "c"]
SHARDS = 40


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 shards of 5-30 samples (split `train`), written by the real `write_shard`."""
    root = tmp_path_factory.mktemp("tiny_shards")
    rng = np.random.default_rng(7)
    counts = [int(c) for c in rng.integers(5, 31, SHARDS)]
    (root / "images").mkdir()
    out = root / "shards"
    out.mkdir()
    entries, number = [], 0
    for shard_number, count in enumerate(counts):
        rows = []
        for _ in range(count):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            path = f"images/{number:05d}.png"
            Image.fromarray(pixels).save(root / path)
            label = number % len(CLASSES)
            rows.append(
                {
                    "id": f"img.{number:05d}",  # a dot: keys are escaped
                    "path": path,
                    "label": label,
                    "class_name": CLASSES[label],
                    "group": str(number),
                    "sha256": "0" * 64,
                }
            )
            number += 1
        job = ShardJob(out / f"train-{shard_number:05d}.tar", rows, root, None, "png", 90, 10**8)
        entries.append(("train", write_shard(job)))
    index = build_index("png", CLASSES, entries)
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def _sample_spans(shards_dir: Path) -> dict[str, tuple[str, int]]:
    """Sample id -> (shard name, bytes its members take in the tar), read with `tarfile`."""
    spans = {}
    for tar_path in sorted(shards_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
            ids = {}
            for member in members:
                if member.name.endswith(".json"):
                    key = member.name.rsplit(".", 1)[0]
                    ids[key] = json.loads(tar.extractfile(member).read())["id"]
        starts: dict[str, int] = {}
        ends: dict[str, int] = {}
        for member in members:
            key = member.name.rsplit(".", 1)[0]
            starts.setdefault(key, member.offset)  # its first header (PAX headers included)
            ends[key] = member.offset_data + math.ceil(member.size / 512) * 512
        for key, sample_id in ids.items():
            spans[sample_id] = (tar_path.name, ends[key] - starts[key])
    return spans


class CountingOpens:
    """Wraps `open_shard`: which shards each reader opens and how many bytes it reads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.opened: list[str] = []
        self.bytes = 0
        real = loaders.open_shard

        def counting_open(url: str, *args, **kwargs):
            stream = real(url, *args, **kwargs)
            self.opened.append(url)
            counter = self

            class Counted(io.RawIOBase):
                def readable(self) -> bool:
                    return True

                def read(self, size: int = -1) -> bytes:
                    data = stream.read(size)
                    counter.bytes += len(data)
                    return data

                def close(self) -> None:
                    stream.close()

            return Counted()

        monkeypatch.setattr(loaders, "open_shard", counting_open)

    def reset(self) -> None:
        self.opened, self.bytes = [], 0


def _stream(shards, rank, world, train, seed=0):
    return ShardStream(
        shards,
        rank=rank,
        world_size=world,
        transform=build_transform(AugmentConfig(), 32, train=train),
        train=train,
        seed=seed,
        shuffle_buffer=8,
    )


# (shards, ranks, DataLoader workers per rank, batch size)
COMBINATIONS = [(18, 16, 4, 4), (7, 3, 2, 8), (5, 1, 1, 16), (40, 8, 1, 16), (13, 4, 3, 5)]


@pytest.mark.parametrize(("shard_count", "world", "workers", "batch"), COMBINATIONS)
def test_each_reader_reads_only_its_share_and_training_samples_at_most_once(
    tiny_shards, monkeypatch, shard_count, world, workers, batch
):
    entries = split_info(tiny_shards, "train").shards[:shard_count]
    total = sum(e.samples for e in entries)
    spans = _sample_spans(tiny_shards)
    smallest = min(e.samples for e in entries)
    counting = CountingOpens(monkeypatch)
    steps = steps_per_epoch(total, world, batch)
    skipped_by_epoch = []
    for epoch in (0, 1):
        seen: Counter[str] = Counter()
        for rank in range(world):
            stream = _stream(entries, rank, world, train=True)
            stream.set_epoch(epoch)
            rank_ids = []
            for worker in range(workers):
                counting.reset()
                ids = [
                    i for _, _, i in stream.samples(False, batch, worker=worker, workers=workers)
                ]
                assert len(ids) % batch == 0  # whole batches per DataLoader worker
                own_bytes = sum(spans[i][1] for i in ids)
                # Its samples' bytes and no more (one block of slack per shard opened) ...
                assert own_bytes <= counting.bytes <= own_bytes + 512 * len(counting.opened)
                # ... from no more shards than its samples need.
                assert len(counting.opened) <= math.ceil(len(ids) / smallest) + 1
                rank_ids += ids
            assert len(rank_ids) == steps * batch  # the same number of full batches per rank
            seen.update(rank_ids)
        assert max(seen.values()) == 1  # nothing repeats within the epoch
        skipped = {i for i, (name, _) in spans.items() if name in _names(entries)} - set(seen)
        assert len(skipped) == total - world * steps * batch < world * batch
        skipped_by_epoch.append(skipped)
    if skipped_by_epoch[0]:
        assert skipped_by_epoch[0] != skipped_by_epoch[1]  # chosen anew each epoch


def _names(entries) -> set[str]:
    return {e.url.rsplit("/", 1)[1] for e in entries}


@pytest.mark.parametrize(("shard_count", "world", "workers"), [(18, 16, 4), (7, 3, 2), (40, 8, 1)])
def test_evaluation_readers_see_every_sample_exactly_once(
    tiny_shards, monkeypatch, shard_count, world, workers
):
    entries = split_info(tiny_shards, "train").shards[:shard_count]
    spans = _sample_spans(tiny_shards)
    counting = CountingOpens(monkeypatch)
    seen: Counter[str] = Counter()
    sizes = []
    for rank in range(world):
        stream = _stream(entries, rank, world, train=False)
        for worker in range(workers):
            counting.reset()
            ids = [i for _, _, i in stream.samples(False, 16, worker=worker, workers=workers)]
            own_bytes = sum(spans[i][1] for i in ids)
            assert own_bytes <= counting.bytes <= own_bytes + 512 * len(counting.opened)
            sizes.append(len(ids))
            seen.update(ids)
    expected = {i for i, (name, _) in spans.items() if name in _names(entries)}
    assert set(seen) == expected and max(seen.values()) == 1
    assert max(sizes) - min(sizes) <= 1  # ranges as equal as possible


def test_plan_deals_whole_batches_and_skips_fewer_than_a_global_batch():
    counts = [int(c) for c in np.random.default_rng(3).integers(5, 31, 18)]
    total = sum(counts)
    world, workers, batch = 16, 4, 4
    steps = total // (world * batch)
    plans = [plan_readers(counts, world, workers, batch, True, seed=1, epoch=e) for e in range(3)]
    for plan in plans:
        taken: Counter[tuple[int, int]] = Counter()
        for segments in plan.readers:
            for s in segments:
                assert 0 <= s.start < s.stop <= counts[s.shard]
                taken.update((s.shard, i) for i in range(s.start, s.stop))
        assert max(taken.values()) == 1
        assert plan.skipped == total - sum(taken.values()) == total - world * steps * batch
        for rank in range(world):
            per_worker = [plan.samples(rank * workers + w) // batch for w in range(workers)]
            assert sum(per_worker) == plan.batches(rank) == steps
            assert max(per_worker) - min(per_worker) <= 1
    assert len({plan.readers for plan in plans}) == 3  # a new deal each epoch
    same = plan_readers(counts, world, workers, batch, True, seed=1, epoch=1)
    assert same == plans[1]  # and the same deal on every rank that asks


def test_a_split_smaller_than_one_global_batch_gives_each_rank_one_smaller_batch():
    plan = plan_readers([5, 6], world_size=3, workers=2, batch_size=16, train=True)
    assert plan.batch_size == 11 // 3 == 3
    assert [plan.batches(rank) for rank in range(3)] == [1, 1, 1]
    assert [plan.samples(r) for r in range(6)] == [3, 0, 3, 0, 3, 0]
    assert plan.skipped == 2
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        plan_readers([1, 2], world_size=4, workers=1, batch_size=8, train=True)


def test_streams_read_shards_of_an_index_without_offsets(tiny_shards, tmp_path):
    """Indexes written before offsets existed still load: shards are read from the start."""
    old = tmp_path / "old"
    old.mkdir()
    index = json.loads((tiny_shards / "index.json").read_text())
    for entry in index["splits"]["train"]["shards"]:
        (old / entry["name"]).write_bytes((tiny_shards / entry["name"]).read_bytes())
        del entry["offsets_file"]  # and the side files are not copied
    (old / "index.json").write_text(json.dumps(index))
    new_entries = split_info(tiny_shards, "train").shards[:7]
    old_entries = split_info(old, "train").shards[:7]
    assert old_entries[0].offsets is None
    for rank in range(3):
        with pytest.warns(UserWarning, match="no sample offsets"):
            stream = _stream(old_entries, rank, 3, train=True, seed=5)
        reference = _stream(new_entries, rank, 3, train=True, seed=5)
        for worker in range(2):
            got = [i for *_, i in stream.samples(False, 4, worker=worker, workers=2)]
            want = [i for *_, i in reference.samples(False, 4, worker=worker, workers=2)]
            assert got == want and got


def test_an_index_with_inline_offsets_still_reads_the_same(tiny_shards, tmp_path):
    """Indexes written before the side files (offsets inside index.json) still load."""
    inline = tmp_path / "inline"
    inline.mkdir()
    index = json.loads((tiny_shards / "index.json").read_text())
    for entry in index["splits"]["train"]["shards"]:
        (inline / entry["name"]).write_bytes((tiny_shards / entry["name"]).read_bytes())
        values = np.frombuffer((tiny_shards / entry.pop("offsets_file")).read_bytes(), "<i8")
        entry["offsets"], entry["end_offset"] = values[:-1].tolist(), int(values[-1])
    (inline / "index.json").write_text(json.dumps(index))
    for rank in range(3):
        got = _stream(split_info(inline, "train").shards, rank, 3, train=True, seed=2)
        want = _stream(split_info(tiny_shards, "train").shards, rank, 3, train=True, seed=2)
        assert [i for *_, i in got.samples(False, 4)] == [i for *_, i in want.samples(False, 4)]


def test_a_rank_reads_only_its_shards_offsets_from_a_small_index(tiny_shards, monkeypatch):
    """index.json holds no per-sample data; each reader loads the side files of the shards
    its segments touch, and no others."""
    import attnpipe.data.shard_index as shard_index

    index_bytes = (tiny_shards / "index.json").stat().st_size
    assert index_bytes < 200 * SHARDS  # names, counts, sizes: nothing per sample
    read: list[str] = []
    real = shard_index.read_offsets
    monkeypatch.setattr(
        shard_index,
        "read_offsets",
        lambda url, n: read.append(url.rsplit("/", 1)[1]) or real(url, n),
    )
    shards = split_info(tiny_shards, "train").shards
    stream = _stream(shards, 5, 8, train=False)
    segments = stream.plan().segments(5, 0)
    assert len(list(stream.samples(False))) == sum(s.stop - s.start for s in segments)
    wanted = sorted({Path(shards[s.shard].url).with_suffix(".idx").name for s in segments})
    assert sorted(read) == wanted and len(wanted) < SHARDS / 4


def test_a_side_file_that_does_not_match_its_index_is_one_clear_error(tiny_shards, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in tiny_shards.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    side = copy / "train-00000.idx"
    side.write_bytes(side.read_bytes()[:-8])
    entry = split_info(copy, "train").shards[0]
    with pytest.raises(ShardFormatError, match=r"offsets for .* samples.*re-run `attnpipe shard`"):
        list(loaders.read_samples(entry, 0, 2))
    side.unlink()
    with pytest.raises(ShardFormatError, match=r"train-00000.idx is missing: re-run"):
        list(loaders.read_samples(entry, 0, 2))


@pytest.mark.parametrize("wrong", ["inside a member", "another sample"])
def test_a_shard_that_does_not_match_its_offsets_is_an_error(tiny_shards, wrong):
    entry = split_info(tiny_shards, "train").shards[0].with_offsets()
    offsets = list(entry.offsets)
    # One block past a header is inside its member; the next sample's offset loses one sample.
    offsets[2] = offsets[2] + 512 if wrong == "inside a member" else offsets[3]
    stale = dataclasses.replace(entry, offsets=tuple(offsets))
    assert len(list(loaders.read_samples(entry, 2, 5))) == 3
    with pytest.raises(ShardFormatError, match=r"index.*re-run `attnpipe shard`"):
        list(loaders.read_samples(stale, 2, 5))


def test_object_storage_readers_fetch_only_their_byte_ranges(tiny_shards, s3_bucket, monkeypatch):
    """On S3 (moto on loopback) each reader's ranged reads add up to its share."""
    url = s3_bucket.url("tiny", "shards")
    publish_shards(tiny_shards, url)
    fetched: list[int] = []
    real = storage.open_input_file

    class CountingFile:  # what the reader asks of the object store
        def __init__(self, handle):
            self.handle = handle

        def seek(self, position: int) -> int:
            return self.handle.seek(position)

        def readinto(self, buffer) -> int:
            count = self.handle.readinto(buffer)
            fetched.append(count)
            return count

        def close(self) -> None:
            self.handle.close()

    def counting_file(location):
        return CountingFile(real(location))

    monkeypatch.setattr(storage, "open_input_file", counting_file)
    entries = split_info(url, "train").shards[:7]
    spans = _sample_spans(tiny_shards)
    seen: list[str] = []
    for rank in range(3):
        stream = _stream(entries, rank, 3, train=True)
        fetched.clear()
        ids = [i for *_, i in stream.samples(False, 8)]
        assert sum(fetched) == sum(spans[i][1] for i in ids)  # exactly its samples' bytes
        seen += ids
    assert (
        len(seen)
        == len(set(seen))
        == 3 * steps_per_epoch(sum(e.samples for e in entries), 3, 8) * 8
    )
