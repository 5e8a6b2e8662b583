"""Mid-epoch checkpoints (issue 28, `train.checkpoint_every`): a reader resumed after k batches
yields what the uninterrupted one yields after them, a checkpoint holds what a resume needs, and
a run resumed from one ends with the uninterrupted run's weights, bit for bit. In this process,
one CPU rank (a test session instead of Ray); the two-rank Ray run with a killed worker is
tests/train/test_mid_epoch_kill.py."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from attnpipe.config import TrainConfig, apply_overrides
from attnpipe.data import loaders as loaders_module
from attnpipe.data.loaders import ShardStream, build_transform, make_loader, split_info
from attnpipe.data.reader_plan import batches_taken
from attnpipe.train import checkpointing as checkpointing_module
from attnpipe.train import loop as loop_module
from attnpipe.train.checkpoint import CHECKPOINT_FILE, read_checkpoint, read_checkpoint_file
from attnpipe.train.checkpoint_writer import CheckpointClock, CheckpointWriter, snapshot
from attnpipe.train.faults import FaultSpecError, planned_faults, planned_step_faults
from attnpipe.train.launch import build_loop_config
from tests.train.test_loop_costs import ResumableSession


# --------------------------------------------------------------------------- the readers
@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Read in this process as a loader worker reads: on one thread (two threads on a busy
    2-core machine make each tiny image 20 times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train_stream(digits_project, rank: int = 0, world: int = 1) -> ShardStream:
    recipe, paths = digits_project
    return ShardStream(
        split_info(paths.shards, "train").shards,
        rank=rank,
        world_size=world,
        transform=build_transform(recipe.augment, 16, train=True),
        train=True,
        seed=3,
        shuffle_buffer=64,
    )


def _reader(stream: ShardStream, worker: int, workers: int, batch: int) -> list[tuple]:
    return [
        (sample_id, image)
        for image, _, sample_id in stream.samples(False, batch, worker=worker, workers=workers)
    ]


@pytest.mark.parametrize("skip", [0, 5])
def test_a_reader_resumed_after_k_batches_yields_the_uninterrupted_rest(
    digits_project, monkeypatch, skip
):
    """Rank 1 of 4, two readers of batch 8: after `skip` of the rank's batches (round robin
    over its readers) each reader yields exactly the uninterrupted reader's rest, the same
    images (the same crops and flips) included, and decodes none of the skipped samples."""
    stream = _train_stream(digits_project, rank=1, world=4)
    stream.set_epoch(2)
    whole = [_reader(stream, worker, 2, 8) for worker in range(2)]
    decoded: list[str] = []
    original = loaders_module.decode_sample
    monkeypatch.setattr(
        loaders_module,
        "decode_sample",
        lambda sample: decoded.append(sample["__key__"]) or original(sample),
    )
    stream.set_epoch(2, skip_batches=skip)
    for worker in range(2):
        rest = _reader(stream, worker, 2, 8)
        taken = batches_taken(skip, 2, worker) * 8
        assert [i for i, _ in rest] == [i for i, _ in whole[worker][taken:]]
        for (_, got), (_, want) in zip(rest, whole[worker][taken:], strict=True):
            assert torch.equal(got, want)
    assert len(decoded) == sum(len(w) for w in whole) - skip * 8  # the skipped ones: never


def test_batches_taken_follows_the_loaders_round_robin():
    assert [batches_taken(5, 2, w) for w in range(2)] == [3, 2]
    assert [batches_taken(0, 3, w) for w in range(3)] == [0, 0, 0]
    assert [batches_taken(4, 3, w) for w in range(3)] == [2, 1, 1]
    assert batches_taken(7, 1, 0) == 7


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_resumed_after_k_batches_gives_the_uninterrupted_batches(digits_project, workers):
    """The DataLoader asks its workers from worker 0: after 5 batches (3 from reader 0, 2 from
    reader 1) reader 1's batch comes next, in the order and with the images of the epoch
    uninterrupted, from a loader built afresh (a new attempt)."""

    def batches(skip: int) -> list[tuple[torch.Tensor, list[str]]]:
        stream = _train_stream(digits_project, rank=1, world=2)
        loader = make_loader(stream, 16, workers=workers)
        stream.set_epoch(1, skip_batches=skip)
        assert len(loader) == 39 - skip
        return [(images, ids) for images, _, ids in loader]

    whole, rest = batches(0), batches(5)
    assert [ids for _, ids in rest] == [ids for _, ids in whole[5:]]
    for (got, _), (want, _) in zip(rest, whole[5:], strict=True):
        assert torch.equal(got, want)


def test_augmentation_does_not_depend_on_the_attempt_or_move_the_training_generator(
    digits_project,
):
    """Each sample's augmentation comes from its own seed (seed, epoch, rank, reader, place):
    not from what the process drew before, and read in this process it leaves the loop's
    generator where it was."""
    stream = _train_stream(digits_project, rank=0, world=4)
    stream.set_epoch(1)
    torch.manual_seed(0)
    first = _reader(stream, 0, 1, 8)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    second = _reader(stream, 0, 1, 8)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, second, strict=True))
    stream.set_epoch(2)
    later = _reader(stream, 0, 1, 8)
    assert not all(torch.equal(a, b) for (_, a), (_, b) in zip(first, later, strict=False))


# --------------------------------------------------------------------------- the loop
class KeepingSession(ResumableSession):
    """One CPU rank: a copy of every checkpoint, epoch ends and mid-epoch ones (which the run
    deletes as it goes), as `<keep>/kept/<n>-epoch<e>[-step<s>]/`, in order."""

    def __init__(self, keep: Path, resume: Path | None = None) -> None:
        super().__init__(keep, resume)
        self.kept: list[Path] = []

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir is not None:
            target = self._next(f"epoch{int(metrics['epoch'])}")
            shutil.copytree(checkpoint_dir, target)

    def mid_epoch_written(self, location: str) -> None:
        position = read_checkpoint_file(location)["position"]
        target = self._next(f"epoch{position['epoch']}-step{position['step']}")
        target.mkdir()
        shutil.copy(location, target / CHECKPOINT_FILE)

    def _next(self, name: str) -> Path:
        self.kept.append(self.keep / "kept" / f"{len(self.kept):03d}-{name}")
        self.kept[-1].parent.mkdir(exist_ok=True)
        return self.kept[-1]


def _train(project, folder: Path, resume: Path | None = None, **train) -> KeepingSession:
    """On `small_digits_project` (tests/train/conftest.py): 11 steps an epoch instead of 39,
    a checkpoint every 2 of them instead of 5. Where checkpoints fall, what they hold and a
    resume that ends bit for bit as the uninterrupted run does are the same for any count."""
    recipe, paths = project
    settings = {"epochs": 2, "workers": 1, "deterministic": True, "checkpoint_every": 2, **train}
    changes = {f"train.{k}": v for k, v in settings.items()}
    changes["tracking.wandb.mode"] = "disabled"
    # Every random draw of the loop in play: augmentation in the readers, MixUp on batches.
    changes["augment.mixup_alpha"] = 0.2
    recipe = apply_overrides(recipe, changes, origin="test")
    config = build_loop_config(recipe, paths).with_changes(best_weights_dir=str(folder / "best"))
    session = KeepingSession(folder, resume)
    write = checkpointing_module.write_checkpoint_file
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            checkpointing_module,
            "write_checkpoint_file",
            lambda location, payload: (
                write(location, payload) or session.mid_epoch_written(location)
            ),
        )
        try:
            loop_module.run_training(config, session)
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(False)
    return session


@pytest.fixture(scope="module")
def uninterrupted(small_digits_project, tmp_path_factory) -> KeepingSession:
    """Two deterministic epochs of 11 batches, a checkpoint every 2 optimizer steps."""
    return _train(small_digits_project, tmp_path_factory.mktemp("uninterrupted"))


def test_mid_epoch_checkpoints_hold_what_a_resume_needs(uninterrupted):
    names = [path.name.split("-", 1)[1] for path in uninterrupted.kept]
    # Every 2 optimizer steps of the run (11 per epoch: 12 to 20 fall in epoch 2), and every
    # epoch's end; no mid-epoch one at an epoch's last step (step 22, the run's last).
    first = [f"epoch0-step{s}" for s in range(2, 11, 2)]
    second = [f"epoch1-step{s - 11}" for s in range(12, 22, 2)]
    assert names == [*first, "epoch1", *second, "epoch2"]
    saved = read_checkpoint(uninterrupted.kept[3])  # epoch 1, step 8
    position = saved["position"]
    assert (position["epoch"], position["step"]) == (0, 8)
    assert (position["world_size"], position["loader_workers"], position["batch_size"]) == (
        1,
        1,
        32,
    )
    assert position["samples"] == [8 * 32] and position["readers"] == [[8 * 32]]
    assert position["loss_sums"][0].shape == () and position["seconds"][0] > 0
    assert saved["schedule_step"] == 8
    assert set(saved["rng"][0]) == {"cpu", "cuda", "numpy", "python"}
    assert {"model", "optimizer", "scaler", "ema"} <= set(saved)
    # The history, best epoch and W&B rows stay per epoch: nothing of epoch 1 yet.
    assert saved["state"]["history"] == [] and saved["state"]["best_location"] is None
    assert [int(r["epoch"]) for r in uninterrupted.reports] == [1, 2]
    assert list((uninterrupted.keep / "mid-epoch").iterdir()) == []  # all epochs saved
    assert read_checkpoint(uninterrupted.kept[5])["position"] is None  # an epoch's end


def test_a_run_resumed_mid_epoch_ends_with_the_uninterrupted_weights(
    small_digits_project, uninterrupted, tmp_path, capfd
):
    """Resumed from epoch 2's checkpoint after 5 of its steps: the rest of the epoch is the
    same, and so are the weights, the optimizer and the epoch's row. The launcher offers epoch
    1's checkpoint; the mid-epoch file beside it goes further, and is taken."""
    epoch_end = next(p for p in uninterrupted.kept if p.name.endswith("-epoch1"))
    middle = next(p for p in uninterrupted.kept if p.name.endswith("epoch1-step5"))
    (tmp_path / "mid-epoch").mkdir()
    shutil.copy(middle / CHECKPOINT_FILE, tmp_path / "mid-epoch" / "e0001-s000005.pt")
    shutil.copy(middle / CHECKPOINT_FILE, tmp_path / "mid-epoch" / "e0000-s000010.pt")  # older
    resumed = _train(small_digits_project, tmp_path, resume=epoch_end)
    assert "resumed from epoch 1, step 5 of epoch 2's 11" in capfd.readouterr().out
    want, got = read_checkpoint(uninterrupted.kept[-1]), read_checkpoint(resumed.kept[-1])
    for key, value in want["model"].items():
        assert torch.equal(value, got["model"][key]), key
    for index, state in want["optimizer"]["state"].items():
        assert all(torch.equal(v, got["optimizer"]["state"][index][k]) for k, v in state.items())
    assert got["schedule_step"] == want["schedule_step"] == 22
    row_want, row_got = want["state"]["history"][-1], got["state"]["history"][-1]
    for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
        assert row_got[key] == row_want[key], key
    assert got["state"]["samples_seen"] == want["state"]["samples_seen"]
    assert got["state"]["resumed_from"] == [1]
    assert list((tmp_path / "mid-epoch").iterdir()) == []  # epoch 2 is saved: none kept


def test_the_writer_keeps_checkpoints_in_order_and_raises_a_failure():
    kept: list[int] = []
    writer = CheckpointWriter(lambda payload: kept.append(payload["n"]))
    for n in range(5):
        writer.submit({"n": n})
    writer.flush()
    assert kept == [0, 1, 2, 3, 4]
    writer.close()

    def fails(payload: dict) -> None:
        raise OSError("disk full")

    failing = CheckpointWriter(fails)
    failing.submit({"weights": torch.ones(2)})
    with pytest.raises(RuntimeError, match="mid-epoch checkpoint failed: disk full"):
        failing.flush()


def test_a_snapshot_is_not_changed_by_training_on():
    weights = {"w": torch.zeros(3)}
    state = {"model": weights, "history": [{"epoch": 1}]}
    copied = snapshot(state)
    weights["w"].add_(1)
    state["history"][0]["epoch"] = 9
    assert torch.equal(copied["model"]["w"], torch.zeros(3))
    assert copied["history"] == [{"epoch": 1}]


def test_a_timed_checkpoint_is_asked_once_by_any_rank():
    clock = CheckpointClock("15m")
    assert (clock.steps, clock.seconds) == (None, 900.0)
    assert clock.wish() == 0 and not clock.due(7, agreed_wish=0)
    clock.last -= 901
    assert clock.wish() == 1 and clock.due(7, agreed_wish=1)
    clock.mark_saved()
    assert clock.wish() == 0 and not clock.due(8, agreed_wish=1)  # voted before it: stale
    steps = CheckpointClock(5)
    assert [s for s in range(1, 16) if steps.due(s, 0)] == [5, 10, 15]
    assert not CheckpointClock(None).enabled


def test_checkpoint_every_takes_steps_or_a_duration_and_keeps_the_run(digits_project):
    recipe, _ = digits_project
    assert TrainConfig(checkpoint_every="15m").checkpoint_every == "15m"
    assert TrainConfig(checkpoint_every="5").checkpoint_every == 5
    for wrong in (0, -3, True, "15x", "0s"):
        with pytest.raises(ValueError, match=r"a duration such as 90s, 15m or 1\.5h"):
            TrainConfig(checkpoint_every=wrong)
    # How a run executes, not what it computes: turning it on resumes the same run.
    every = apply_overrides(recipe, {"train.checkpoint_every": "30m"}, origin="test")
    assert every.weights_fingerprint() == recipe.weights_fingerprint()


def test_a_mid_epoch_kill_names_its_epoch_step_and_rank():
    assert planned_step_faults("trained:2.7@1, checkpointed:2,trained:1.3") == {
        (2, 7, 1),
        (1, 3, None),
    }
    assert planned_faults("trained:2.7@1,checkpointed:2") == {("checkpointed", 2)}
    with pytest.raises(FaultSpecError, match=r"trained:<epoch>\.<step>"):
        planned_step_faults("trained:2")
