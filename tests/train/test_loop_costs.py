"""Right and cheap on every step (issue 21): repeatable runs, best weights stored once, resume
across AMP modes, an EMA and a stop vote that never wait for the device. The loop runs in this
process on one CPU rank (a test session instead of Ray)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from attnpipe.config import Recipe, apply_overrides
from attnpipe.modelfile import load_model_file
from attnpipe.paths import PipelinePaths
from attnpipe.train import build as build_module
from attnpipe.train import launch as launch_module
from attnpipe.train import loop as loop_module
from attnpipe.train import steps as steps_module
from attnpipe.train.checkpoint import CHECKPOINT_FILE, read_checkpoint, restore_scaler
from attnpipe.train.ema import DeviceEma
from attnpipe.train.finished import FINISHED_FILE, finished_location, finished_state
from attnpipe.train.launch import build_loop_config
from attnpipe.train.repeatability import apply_determinism
from attnpipe.train.stop_vote import StopVote


class ResumableSession:
    """One CPU rank; keeps every checkpoint as `<keep>/epoch<e>/` and resumes from `resume`."""

    rank, world_size, node_id = 0, 1, "local"
    device = torch.device("cpu")

    def __init__(self, keep: Path, resume: Path | None = None) -> None:
        self.keep, self.resume = keep, resume
        self.reports: list[dict] = []
        self.stop_answers: list[bool] = []

    def prepare_model(self, model: nn.Module, forward_sync_buffers: bool = True) -> nn.Module:
        return model

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        yield self.resume

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, self.keep / f"epoch{int(metrics['epoch'])}")

    def stop_requested(self) -> bool:
        return self.stop_answers.pop(0) if self.stop_answers else False


def _run_recipe(recipe: Recipe, **train) -> Recipe:
    """The recipe `_train` runs: one epoch on one rank, W&B off, with `train` changes."""
    changes = {f"train.{k}": v for k, v in {"epochs": 1, "workers": 1, **train}.items()}
    changes["tracking.wandb.mode"] = "disabled"
    return apply_overrides(recipe, changes, origin="test")


def _train(project, folder: Path, resume: Path | None = None, **train) -> ResumableSession:
    """Nothing the runs of this file check depends on how many steps an epoch has: they train
    `small_digits_project` (tests/train/conftest.py), 11 steps an epoch instead of 39."""
    recipe, paths = project
    recipe = _run_recipe(recipe, **train)
    config = build_loop_config(recipe, paths).with_changes(best_weights_dir=str(folder / "best"))
    session = ResumableSession(folder, resume)
    threads = torch.get_num_threads()
    try:
        loop_module.run_training(config, session)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    return session


@pytest.fixture(scope="module")
def repeatable_run(small_digits_project, tmp_path_factory) -> Path:
    """One deterministic epoch: the folder of its checkpoints."""
    folder = tmp_path_factory.mktemp("repeatable")
    _train(small_digits_project, folder, deterministic=True)
    return folder


def test_two_deterministic_cpu_runs_give_identical_weights(
    small_digits_project, repeatable_run, tmp_path
):
    _train(small_digits_project, tmp_path, deterministic=True)
    first = read_checkpoint(repeatable_run / "epoch1")
    second = read_checkpoint(tmp_path / "epoch1")
    assert first["model"].keys() == second["model"].keys()
    for key, value in first["model"].items():
        assert torch.equal(value, second["model"][key]), key
    assert first["state"]["history"][0]["train_loss"] == second["state"]["history"][0]["train_loss"]


def test_deterministic_switches_are_set_before_cuda_starts(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    try:
        apply_determinism(False)
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.backends.cudnn.benchmark
        apply_determinism(True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled()
        # Kernels without a deterministic version warn instead of stopping the run.
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    from attnpipe.config import TrainConfig

    gpu = torch.device("cuda", 0)
    assert not build_module.speed_settings(TrainConfig(deterministic=True), gpu).cudnn_benchmark


def test_an_epoch_that_did_not_improve_stores_no_second_copy_of_the_weights(
    small_digits_project, repeatable_run, tmp_path, monkeypatch
):
    """Resume after epoch 1 (which was the best) and validate epoch 2 as worse."""
    first = read_checkpoint(repeatable_run / "epoch1")
    assert Path(first["state"]["best_location"]) == repeatable_run / "best" / "epoch0001.pt"
    worse = {"loss": 9.0, "accuracy": -1.0}
    monkeypatch.setattr(loop_module, "validate", lambda run: dict(worse))
    _train(small_digits_project, tmp_path, resume=repeatable_run / "epoch1", epochs=2)

    second = read_checkpoint(tmp_path / "epoch2")
    assert second["state"]["best_epoch"] == 1
    assert second["state"]["best_location"] == first["state"]["best_location"]  # a reference
    # No weights written: only the finished run's record (attnpipe.train.finished).
    assert [p.name for p in (tmp_path / "best").iterdir()] == [FINISHED_FILE]
    tensors = [k for k, v in second["state"].items() if isinstance(v, dict | torch.Tensor)]
    assert tensors == []  # the state carries no weights at all
    model_bytes = _saved_size({"model": second["model"]}, tmp_path)
    rest = {k: v for k, v in second.items() if k not in ("model", "optimizer")}
    assert _saved_size(rest, tmp_path) < 0.1 * model_bytes  # RNGs and history, no weights


def _saved_size(payload: dict, folder: Path) -> int:
    path = folder / "size.pt"
    torch.save(payload, path)
    return path.stat().st_size


def test_resume_from_an_fp16_checkpoint_with_bf16(small_digits_project, repeatable_run, tmp_path):
    fp16 = tmp_path / "fp16"
    fp16.mkdir()
    saved = read_checkpoint(repeatable_run / "epoch1")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # starts its state
    saved["scaler"] = scaler.state_dict()
    assert saved["scaler"]  # what an fp16 run saves
    torch.save(saved, fp16 / CHECKPOINT_FILE)
    session = _train(small_digits_project, tmp_path, resume=fp16, epochs=2, amp="bf16")
    assert [int(r["epoch"]) for r in session.reports] == [2]
    resumed = read_checkpoint(tmp_path / "epoch2")
    assert resumed["scaler"] == {}  # bf16 has no scaler
    assert resumed["state"]["resumed_from"] == [1]


def test_scaler_state_is_kept_or_started_fresh_across_amp_modes():
    fp16 = torch.amp.GradScaler("cpu", init_scale=512.0)
    fp16.scale(torch.ones(()))
    fresh = torch.amp.GradScaler("cpu", init_scale=8.0)
    restore_scaler(fresh, {})  # from a bf16 or fp32 checkpoint: no state, a fresh scale
    assert fresh.get_scale() == 8.0
    restore_scaler(fresh, fp16.state_dict())  # fp16 to fp16: carried on
    assert fresh.get_scale() == 512.0
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    restore_scaler(disabled, fp16.state_dict())  # fp16 to bf16: ignored
    assert not disabled.is_enabled()


def test_device_ema_matches_torch_averaged_model_without_reading_the_device(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ema = DeviceEma(model, 0.9)
    reads: list[torch.Tensor] = []

    def counted(self: torch.Tensor) -> bool:
        reads.append(self)
        return True

    for _ in range(3):
        model(torch.randn(8, 4)).sum().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        with monkeypatch.context() as patched:
            patched.setattr(torch.Tensor, "item", counted)
            patched.setattr(torch.Tensor, "__bool__", counted)
            ema.update_parameters(model)
        reference.update_parameters(model)
    assert reads == []  # no host read of a device value per update
    for (name, mine), theirs in zip(
        ema.module.state_dict().items(), reference.module.state_dict().values(), strict=True
    ):
        if mine.is_floating_point():
            assert torch.allclose(mine, theirs, atol=1e-6), name
    assert int(ema.n_averaged) == 3
    restored = DeviceEma(model, 0.9)
    restored.load_state_dict(ema.state_dict())  # and from torch's own layout
    restored.load_state_dict(reference.state_dict())
    assert restored._updates == 3


class _Session:
    rank, world_size = 0, 1
    device = torch.device("cpu")

    def __init__(self, answers: list[bool]) -> None:
        self.answers = answers

    def stop_requested(self) -> bool:
        return self.answers.pop(0)


def test_stop_vote_acts_on_the_previous_check_at_the_same_step():
    vote = StopVote(_Session([False, True, False]), every=5)
    assert [s for s in range(20) if vote.due(s)] == [4, 9, 14, 19]
    assert vote.check() is False  # nothing in flight yet; asks "no"
    assert vote.check() is False  # reads "no"; asks "yes"
    assert vote.check() is True  # reads "yes" one check later
    assert vote.settle() is False and vote.settle() is False  # nothing left in flight


def test_a_stop_requested_mid_epoch_ends_the_run_after_the_next_check(
    digits_project, tmp_path, monkeypatch
):
    """1,257 images in batches of 16: 78 steps. Asked at the first check (step 5), agreed at
    the second (step 10): the epoch is not saved, and the run returns. (Small batches: the
    10 steps it trains cost a quarter of 10 steps of 64; the vote counts steps, not images.)"""
    recipe, paths = digits_project
    changes = {"train.epochs": 1, "train.workers": 1, "train.batch_size": 16}
    changes["tracking.wandb.mode"] = "disabled"
    recipe = apply_overrides(recipe, changes, origin="test")
    config = build_loop_config(recipe, paths).with_changes(best_weights_dir=str(tmp_path))
    session = ResumableSession(tmp_path)
    session.stop_answers = [True]
    steps: list[int] = []
    original = steps_module.train_step
    monkeypatch.setattr(
        steps_module,
        "train_step",
        lambda run, step, *a: steps.append(step) or original(run, step, *a),
    )
    threads = torch.get_num_threads()
    try:
        loop_module.run_training(config, session)
    finally:
        torch.set_num_threads(threads)
    assert session.reports == []  # stopped before the epoch ended: nothing checkpointed
    assert steps[-1] == 9


def test_the_next_epoch_is_requested_from_the_loader_workers_before_validation(digits_project):
    """`iter(loader)` (what the loop does before validating) sends the persistent workers the
    next epoch's first requests at once; the old lazy iterator sent nothing until the first
    batch was asked for, so every epoch began with an empty pipeline."""
    from attnpipe.data.loaders import split_info

    recipe, paths = digits_project
    recipe = apply_overrides(recipe, {"train.loader_workers": 1}, origin="test")
    config = build_loop_config(recipe, paths)
    session = ResumableSession(Path("unused"))
    # One of the four training shards, in 9 batches of 32 (more than the 4 requests a worker
    # has in flight): when the workers are sent requests does not depend on how much they
    # read, and the worker decodes a quarter of the split twice instead of all of it.
    shards = split_info(config.shards, "train").shards[:1]
    stream = build_module.build_stream(recipe, shards, session, train=True)
    loader = build_module.build_loader(
        stream, 32, recipe.train, session, torch.contiguous_format, purpose=0
    )
    first = sum(1 for _ in loader)  # epoch 0, whole
    stream.set_epoch(1)
    batches = iter(loader)
    workers = loader.dataloader._iterator  # the persistent workers' iterator, reset
    # Reset for the new epoch (nothing received yet), its workers running, requests out.
    assert workers._rcvd_idx == 0 and all(workers._workers_status) and workers._send_idx > 0
    assert sum(1 for _ in batches) == first == len(loader)


@pytest.mark.parametrize("sync_batchnorm", [True, False])
def test_ddp_broadcasts_buffers_only_without_sync_batchnorm(digits_project, sync_batchnorm):
    """Two ranks (rank 0 built here, no process group needed to build): SyncBatchNorm keeps
    the ranks' statistics equal, so DDP is asked not to broadcast them before every forward."""
    recipe, paths = digits_project
    changes = {"train.sync_batchnorm": sync_batchnorm, "tracking.wandb.mode": "disabled"}
    recipe = apply_overrides(recipe, changes, origin="test")
    asked: list[bool] = []

    class TwoRanks(ResumableSession):
        world_size = 2

        def prepare_model(self, model: nn.Module, forward_sync_buffers: bool = True) -> nn.Module:
            asked.append(forward_sync_buffers)
            return model

    threads = torch.get_num_threads()
    try:
        run = build_module.build(build_loop_config(recipe, paths), TwoRanks(Path("unused")))
    finally:
        torch.set_num_threads(threads)
    assert asked == [not sync_batchnorm]
    synced = any(isinstance(m, nn.SyncBatchNorm) for m in run.model.modules())
    assert synced == sync_batchnorm


def _ended_checkpoint(repeatable_run: Path, folder: Path, early_stopped: bool) -> Path:
    """Epoch 1's checkpoint as a run that ended: after 3 epochs of which only the first was
    the best (early stopped with patience 2), or as is (all of `epochs: 1` trained)."""
    saved = read_checkpoint(repeatable_run / "epoch1")
    if early_stopped:
        state = saved["state"]
        worse = {**state["history"][0], "val_accuracy": -1.0, "val_loss": 9.0}
        state["history"] += [{**worse, "epoch": 2}, {**worse, "epoch": 3}]
        state["epoch"], state["samples_seen"] = 3, 3 * state["samples_seen"]
    folder.mkdir()
    torch.save(saved, folder / CHECKPOINT_FILE)
    return folder


@pytest.mark.parametrize("early_stopped", [True, False])
def test_a_run_that_ended_trains_nothing_when_launched_again(
    small_digits_project, repeatable_run, tmp_path, monkeypatch, capfd, early_stopped
):
    """Launched again (dvc repro after a failed upload, a re-submitted job), an early-stopped
    or finished run decides before its first epoch: no step, no checkpoint, the same weights
    and the same best epoch. Before, the early-stopped one trained epoch 4 (and, with each
    launch, up to `patience` more) before asking whether to stop."""
    resume = _ended_checkpoint(repeatable_run, tmp_path / "ended", early_stopped)
    saved = read_checkpoint(resume)
    steps: list[int] = []
    original = steps_module.train_step
    monkeypatch.setattr(
        steps_module,
        "train_step",
        lambda run, step, *a: steps.append(step) or original(run, step, *a),
    )
    finished: list[tuple] = []
    monkeypatch.setattr(
        loop_module,
        "finish",
        lambda run, state, tracker: finished.append((run.model.state_dict(), state)),
    )
    train = {"epochs": 10, "early_stopping_patience": 2} if early_stopped else {"epochs": 1}
    session = _train(small_digits_project, tmp_path, resume=resume, **train)

    assert steps == [] and session.reports == []  # no step, nothing checkpointed
    ((weights, state),) = finished  # ...and it still finishes: W&B summary, model artifact
    assert state.epoch == saved["state"]["epoch"] and len(state.history) == state.epoch
    assert state.best_epoch == 1
    assert state.best_location == saved["state"]["best_location"]  # the same model.pt
    for key, value in saved["model"].items():
        assert torch.equal(weights[key], value), key
    said = capfd.readouterr().out
    reason = (
        "early stopping ended it at epoch 3 (patience 2)"
        if early_stopped
        else "it trained all its epochs (1)"
    )
    assert f"nothing to train: {reason}; the best epoch stays 1" in said


def test_a_finished_run_records_its_end_for_this_wandb_run_and_recipe(
    small_digits_project, repeatable_run
):
    recipe, paths = small_digits_project
    recipe = _run_recipe(recipe, deterministic=True)  # repeatable_run's
    wandb_id = build_loop_config(recipe, paths).wandb_run_id
    best = str(repeatable_run / "best")
    assert Path(finished_location(best)).is_file()  # written by the run's finish
    ended = finished_state(best, wandb_id, recipe.train)
    saved = read_checkpoint(repeatable_run / "epoch1")["state"]
    assert ended is not None and ended.to_dict() == saved  # the last checkpoint's state
    # Another W&B run (a DVC experiment's) must get its own summary: the workers' job.
    assert finished_state(best, wandb_id + "-other", recipe.train) is None
    # More epochs: the run is not finished under this recipe.
    more = apply_overrides(recipe, {"train.epochs": 2}, origin="test")
    assert finished_state(best, wandb_id, more.train) is None


def test_training_again_forgets_the_end_until_the_run_finishes_again(
    small_digits_project, repeatable_run, tmp_path, monkeypatch
):
    """Resumed for a second epoch, the run deletes its record before training: a kill
    before the new end must not leave a record of the old one."""
    shutil.copytree(repeatable_run / "best", tmp_path / "best")
    record = Path(finished_location(str(tmp_path / "best")))
    finishes: list[bool] = []
    monkeypatch.setattr(loop_module, "finish", lambda *args: finishes.append(record.exists()))
    _train(small_digits_project, tmp_path, resume=repeatable_run / "epoch1", epochs=2)
    assert finishes == [False] and not record.exists()


def test_a_finished_run_launched_again_writes_its_outputs_without_starting_ray(
    small_digits_project, repeatable_run, tmp_path, monkeypatch, capsys
):
    recipe, built = small_digits_project
    paths = PipelinePaths(tmp_path / "project", recipe.name)
    shutil.copytree(built.root, paths.root)
    recipe = _run_recipe(recipe, deterministic=True)  # repeatable_run's
    loop = build_loop_config(recipe, paths)
    shutil.copytree(repeatable_run / "best", loop.best_weights_dir)

    def no_cluster(*args, **kwargs):
        raise AssertionError("a finished run started a cluster")

    monkeypatch.setattr(launch_module, "training_cluster", no_cluster)
    result = launch_module.train(recipe, paths)

    saved = read_checkpoint(repeatable_run / "epoch1")
    assert (result.run_name, result.epochs_run) == (loop.run_name, 1)
    assert result.best_epoch == saved["state"]["best_epoch"] == 1
    model, payload = load_model_file(paths.model_file)
    assert payload["run_name"] == loop.run_name and payload["metrics"] == result.best_metrics
    best = torch.load(saved["state"]["best_location"], map_location="cpu", weights_only=True)
    weights = model.state_dict()
    assert best and all(torch.equal(weights[key], value) for key, value in best.items())
    assert len(paths.train_history.read_text().splitlines()) == 1 + 1
    said = capsys.readouterr().out
    assert f"training run '{loop.run_name}': nothing to train" in said
