"""The training loop in one process (a test session instead of Ray): EMA, accumulation,
learning-rate scaling and position, checkpoint contents, device switches."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from attnpipe.config import TrainConfig, apply_overrides
from attnpipe.train import checkpoint as checkpoint_module
from attnpipe.train.build import speed_settings
from attnpipe.train.checkpoint import read_checkpoint, restore_rng, rng_state
from attnpipe.train.ema import ema_step_decay
from attnpipe.train.launch import build_loop_config
from attnpipe.train.loop import run_training
from attnpipe.train.schedules import LrSchedule, scaled_lr
from attnpipe.train.steps import train_step


class LocalSession:
    """One rank, CPU, no Ray: keeps every reported checkpoint folder's file."""

    rank, world_size, node_id = 0, 1, "local"
    device = torch.device("cpu")

    def __init__(self, keep: Path) -> None:
        self.keep = keep
        self.reports: list[dict] = []

    def prepare_model(self, model: nn.Module, forward_sync_buffers: bool = True) -> nn.Module:
        return model

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        yield None

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir is not None:
            target = self.keep / f"epoch{int(metrics['epoch'])}.pt"
            target.write_bytes((checkpoint_dir / checkpoint_module.CHECKPOINT_FILE).read_bytes())

    def stop_requested(self) -> bool:
        return False


def _run(project, tmp_path: Path, **train: object) -> tuple[LocalSession, dict]:
    """What the runs here check (the EMA's statistics, the schedule's end with a short last
    group, the checkpoint's contents) does not depend on how many steps an epoch has: they
    train `small_digits_project` (tests/train/conftest.py), 11 steps an epoch instead of 39."""
    recipe, paths = project
    changes = {f"train.{k}": v for k, v in {"epochs": 1, "workers": 1, **train}.items()}
    changes["tracking.wandb.mode"] = "disabled"
    recipe = apply_overrides(recipe, changes, origin="test")
    session = LocalSession(tmp_path)
    threads = torch.get_num_threads()
    try:
        run_training(build_loop_config(recipe, paths), session)
    finally:
        torch.set_num_threads(threads)
    last = sorted(tmp_path.glob("epoch*.pt"))[-1]
    return session, torch.load(last, weights_only=True)


@pytest.fixture(scope="module")
def ema_run(small_digits_project, tmp_path_factory) -> dict:
    """One epoch with an EMA: the last checkpoint's contents."""
    return _run(small_digits_project, tmp_path_factory.mktemp("ema"), ema_decay=0.9)[1]


def test_ema_keeps_batchnorm_statistics_of_its_own(ema_run):
    """The EMA network is validated, chosen and saved: its BatchNorm running statistics must
    follow training, not stay at their initial zeros and ones."""
    saved = ema_run
    ema = saved["ema"]
    means = [v for k, v in ema.items() if k.endswith("running_mean")]
    variances = [v for k, v in ema.items() if k.endswith("running_var")]
    assert means and all(m.abs().sum() > 0 for m in means)
    assert all(not torch.allclose(v, torch.ones_like(v)) for v in variances)
    # ...and they are an average of the trained network's, not a copy of its last values.
    model = saved["model"]
    key = next(k for k in ema if k.endswith("running_mean"))
    assert not torch.equal(ema[key], model[key.removeprefix("module.")])


def test_accumulation_schedule_ends_on_its_last_step(small_digits_project, tmp_path, capfd):
    """361 training images, batch 32: 11 batches, groups of 4 -> 3 optimizer steps per
    epoch (the last group holds 3 batches and still steps), cosine over exactly those.
    The AMP choice is printed once, at the start."""
    session, saved = _run(
        small_digits_project,
        tmp_path,
        epochs=2,
        accumulate_steps=4,
        schedule={"name": "cosine", "warmup_epochs": 0},
    )
    assert saved["schedule_step"] == 2 * 3
    said = [line for line in capfd.readouterr().out.splitlines() if "mixed precision" in line]
    assert said == ["mixed precision: off (float32) (train.amp: auto, on CPUs)"]
    lrs = [row["lr"] for row in session.reports]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)  # after its last step: the end
    # The rate during the last step was still above zero (the old schedule hit 0 early).
    assert lrs[0] > 0 and min(lrs[:-1]) > 0


class _Recorder(torch.optim.SGD):
    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None):
        self.grads.append(next(iter(self.param_groups[0]["params"])).grad.clone())


def test_a_short_last_group_averages_over_its_own_batches():
    """7 batches in groups of 4: the second group has 3, and its step uses their mean."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False)
    batches = [(torch.randn(5, 3), torch.randint(0, 2, (5,))) for _ in range(7)]
    optimizer = _Recorder(model.parameters())
    run = SimpleNamespace(
        train=SimpleNamespace(accumulate_steps=4, grad_clip_norm=None),
        steps=7,
        world=1,
        device=torch.device("cpu"),
        amp_dtype=None,
        ddp_model=model,
        model=model,
        criterion=nn.CrossEntropyLoss(),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        optimizer=optimizer,
        schedule=SimpleNamespace(step=lambda: None),
        ema=None,
    )
    for step, (x, y) in enumerate(batches):
        train_step(run, step, x, y)
    assert len(optimizer.grads) == 2

    def mean_grad(group):
        model.zero_grad()
        sum(nn.functional.cross_entropy(model(x), y) for x, y in group).backward()
        return model.weight.grad / len(group)

    assert torch.allclose(optimizer.grads[0], mean_grad(batches[:4]), atol=1e-6)
    assert torch.allclose(optimizer.grads[1], mean_grad(batches[4:]), atol=1e-6)


def test_learning_rate_follows_the_global_batch():
    config = TrainConfig(optimizer={"lr": 0.1, "reference_batch": 256, "scale_lr": "linear"})
    assert scaled_lr(config.optimizer, 1024) == pytest.approx(0.4)
    sqrt = config.optimizer.model_copy(update={"scale_lr": "sqrt"})
    assert scaled_lr(sqrt, 1024) == pytest.approx(0.2)
    assert scaled_lr(config.optimizer.model_copy(update={"scale_lr": "none"}), 1024) == 0.1


def test_a_resumed_run_keeps_its_place_on_another_world_size():
    """After 3 of 8 epochs: the same point of the curve with 2 ranks (10 steps per epoch) as
    with 16 (about a tenth of the steps), because the position counts epochs, not steps."""
    from attnpipe.config import ScheduleConfig

    config = ScheduleConfig(name="cosine", warmup_epochs=1)
    param = nn.Parameter(torch.zeros(1))
    on_2 = LrSchedule(torch.optim.SGD([param], lr=1.0), config, 0.1, 80, 8)
    on_16 = LrSchedule(torch.optim.SGD([param], lr=1.0), config, 0.8, 10, 8)
    on_2.set_position(3)
    on_16.set_position(3)
    assert on_2.factor() == pytest.approx(on_16.factor())
    assert on_16.get_last_lr()[0] == pytest.approx(8 * on_2.get_last_lr()[0])


def test_the_position_follows_samples_seen_not_the_step_count():
    """An elastic run: 2 epochs on 2 ranks (1,257 samples, batch 32: 19 batches each, 1,216
    samples an epoch), then on 1 rank (39 batches, 1,248 samples an epoch). It resumes where
    2,432 samples put it, 2,432 / 1,248 of an epoch of 39 steps: step 76, not 2 x 39 = 78."""
    from attnpipe.config import ScheduleConfig
    from attnpipe.train.build import epoch_samples

    assert epoch_samples(1257, 2, 32) == 1216 and epoch_samples(1257, 1, 32) == 1248
    assert epoch_samples(5, 2, 32) == 4  # a tiny split: one batch of samples // world each
    param = nn.Parameter(torch.zeros(1))
    schedule = LrSchedule(torch.optim.SGD([param], lr=1.0), ScheduleConfig(), 0.1, 39, 4)
    schedule.set_position_by_samples(2 * 1216, 1248)
    assert schedule.step_count == 76
    schedule.set_position_by_samples(2 * 1248, 1248)  # the same world size: whole epochs
    assert schedule.step_count == 78


def test_checkpoint_holds_every_generator_and_restores_the_cuda_one(monkeypatch, tmp_path):
    """On a GPU each rank's CUDA generator is saved beside the CPU one and put back on
    resume; the structure is checked here with torch.cuda's calls stood in for."""
    cuda_state = torch.arange(16, dtype=torch.uint8)
    restored: list[torch.Tensor] = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: cuda_state.clone())
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, device=None: restored.append(state)
    )
    gpu = torch.device("cuda", 0)
    state = rng_state(gpu)
    assert set(state) == {"cpu", "cuda", "numpy", "python"}
    assert torch.equal(state["cuda"], cuda_state)
    assert rng_state(torch.device("cpu"))["cuda"] is None
    torch.save({"rng": [state, state]}, tmp_path / checkpoint_module.CHECKPOINT_FILE)
    saved = read_checkpoint(tmp_path)["rng"]
    restore_rng(saved, rank=1, device=gpu)
    assert len(restored) == 1 and torch.equal(restored[0], cuda_state)
    restore_rng([torch.get_rng_state()], rank=0, device=torch.device("cpu"))  # older files


def test_checkpoint_of_a_cpu_run_lists_each_generator(ema_run):
    saved = ema_run
    assert [set(s) for s in saved["rng"]] == [{"cpu", "cuda", "numpy", "python"}]
    assert saved["rng"][0]["cuda"] is None
    assert saved["state"]["samples_seen"] == 11 * 32


def test_speed_switches_are_on_for_gpus_and_off_for_cpus():
    auto = TrainConfig()
    gpu = speed_settings(auto, torch.device("cuda", 0))
    assert gpu.memory_format == torch.channels_last and gpu.cudnn_benchmark and gpu.tf32
    cpu = speed_settings(auto, torch.device("cpu"))
    assert cpu.memory_format == torch.contiguous_format and not (cpu.cudnn_benchmark or cpu.tf32)
    forced = speed_settings(TrainConfig(channels_last=True), torch.device("cpu"))
    assert forced.memory_format == torch.channels_last


def test_the_ema_spans_the_same_images_on_1_and_2_ranks():
    """`train.ema_decay` is per reference batch of images: at batch 64 per rank, 1,280 images
    are 20 steps on one rank and 10 on two, and leave the same share of the start in the EMA."""
    one, two = ema_step_decay(0.999, 1 * 64, 256), ema_step_decay(0.999, 2 * 64, 256)
    assert one**20 == pytest.approx(two**10, rel=1e-12)
    assert one ** (1 / 64) == pytest.approx(two ** (1 / 128), rel=1e-12)  # the decay per image
    assert ema_step_decay(0.999, 256, 256) == 0.999  # as given, at the reference batch
    assert two < one  # more images per step: more decay per step


@pytest.mark.parametrize("world", [1, 2])
def test_the_run_gets_the_ema_decay_of_its_world_size(digits_project, tmp_path, world):
    """Built as rank 0 of `world` (no process group is needed to build)."""
    from attnpipe.train.build import build

    recipe, paths = digits_project
    changes = {"train.ema_decay": 0.99, "train.batch_size": 32, "tracking.wandb.mode": "disabled"}
    recipe = apply_overrides(recipe, changes, origin="test")
    session = LocalSession(tmp_path)
    session.world_size = world
    threads = torch.get_num_threads()
    try:
        run = build(build_loop_config(recipe, paths), session)
    finally:
        torch.set_num_threads(threads)
    reference = recipe.train.optimizer.reference_batch
    assert run.ema.decay == pytest.approx(0.99 ** (world * 32 / reference))


def _rates(schedule: LrSchedule, steps: int) -> list[float]:
    """The rate of each of the next `steps` optimizer steps."""
    rates = []
    for _ in range(steps):
        rates.append(schedule.get_last_lr()[0])
        schedule.step()
    return rates


def test_after_growing_the_rate_ramps_from_the_old_scale_to_the_new():
    """8 -> 16 ranks with linear scaling: 0.4 -> 0.8, over 4 steps, not at once."""
    from attnpipe.config import ScheduleConfig

    param = nn.Parameter(torch.zeros(1))
    on_16 = LrSchedule(
        torch.optim.SGD([param], lr=1.0), ScheduleConfig(name="constant"), 0.8, 10, 8
    )
    on_16.set_position(3)
    on_16.rewarm(0.4, 4)
    assert _rates(on_16, 5) == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.8])
    # A restart 2 steps into the ramp (at 16 ranks) goes on with it.
    on_16.set_position(3)
    on_16.rewarm(0.4, 4, done=2)
    assert _rates(on_16, 3) == pytest.approx([0.7, 0.8, 0.8])
    # The schedule's own factor applies on top of the ramping base.
    cosine = LrSchedule(torch.optim.SGD([param], lr=1.0), ScheduleConfig(), 0.8, 10, 8)
    cosine.set_position(3)
    factor = cosine.factor()
    cosine.rewarm(0.4, 4)
    assert cosine.get_last_lr()[0] == pytest.approx(0.5 * factor)
    shrunk = LrSchedule(
        torch.optim.SGD([param], lr=1.0), ScheduleConfig(name="constant"), 0.4, 10, 8
    )
    shrunk.rewarm(0.8, 4)  # fewer ranks: the lower rate at once, nothing to ramp
    assert _rates(shrunk, 2) == pytest.approx([0.4, 0.4])


def test_a_resume_on_more_ranks_re_warms_and_others_do_not():
    from attnpipe.train.schedules import rewarm_plan

    assert rewarm_plan([8, 8], 16, 30, 100) == (8, 0)  # grew just now
    assert rewarm_plan([8, 16], 16, 30, 100) == (8, 30)  # restarted 30 steps into the ramp
    assert rewarm_plan([8, 16, 16, 16, 16], 16, 30, 100) is None  # ramp over (120 steps)
    assert rewarm_plan([16, 16], 16, 30, 100) is None  # same size
    assert rewarm_plan([16], 8, 30, 100) is None  # shrank: a lower rate needs no ramp
    assert rewarm_plan([8], 16, 30, 0) is None  # train.rewarm_steps: 0 is off
    assert rewarm_plan([], 16, 30, 100) is None and rewarm_plan([None], 16, 30, 100) is None


def test_resume_after_growth_sets_the_ramp_from_the_history():
    from attnpipe.train.checkpoint import TrainingState
    from attnpipe.train.checkpointing import rewarm_after_growth

    train = TrainConfig(
        batch_size=32, optimizer={"lr": 0.1, "reference_batch": 256, "scale_lr": "linear"}
    )
    param = nn.Parameter(torch.zeros(1))
    schedule = LrSchedule(
        torch.optim.SGD([param], lr=1.0),
        train.schedule.model_copy(update={"name": "constant"}),
        scaled_lr(train.optimizer, 16 * 32),
        10,
        8,
    )
    state = TrainingState()
    state.history = [{"epoch": 1, "world_size": 8}]
    run = SimpleNamespace(train=train, world=16, rank=1, schedule=schedule)
    rewarm_after_growth(run, state)
    ramp = _rates(schedule, train.rewarm_steps + 1)
    assert ramp[0] == pytest.approx(0.1 + 0.1 / train.rewarm_steps)  # from 8 ranks' 0.1...
    assert ramp[-2:] == pytest.approx([0.2, 0.2])  # ...to 16 ranks' 0.2, in rewarm_steps
    assert all(a < b for a, b in itertools.pairwise(ramp[:-1]))
