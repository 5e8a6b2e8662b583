"""The stop vote settles for any epoch length and never waits for the GPU (issue 28): two real
gloo ranks on the CPU run the real step loop (`train_one_epoch`) with epochs of 3 steps, fewer
than the 5 between checks, and the loop's order of vote, checkpoint and settle."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from attnpipe.train.steps import train_one_epoch
from attnpipe.train.stop_vote import StopVote
from tests.train.two_ranks import free_port, gloo_group, run_two_ranks

pytestmark = [pytest.mark.timing, pytest.mark.timeout(120)]  # two ranks: a collective timeout

STEPS = 3  # per epoch: below STOP_CHECK_STEPS, so no check is ever due within an epoch
EPOCHS = 4


class _Session:
    def __init__(self, rank: int, world_size: int, asks: bool, device: str = "cpu") -> None:
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.asks = asks  # rank 0 polls the driver's flag; here it is set from the start

    def stop_requested(self) -> bool:
        return self.asks


def _tiny_run(world: int) -> SimpleNamespace:
    model = nn.Linear(4, 3)
    return SimpleNamespace(
        train=SimpleNamespace(accumulate_steps=1, grad_clip_norm=None),
        steps=STEPS,
        world=world,
        device=torch.device("cpu"),
        amp_dtype=None,
        ddp_model=model,
        model=model,
        criterion=nn.CrossEntropyLoss(),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        schedule=SimpleNamespace(step=lambda: None),
        ema=None,
        batch_augment=lambda images, labels: (images, labels),
        tracer=SimpleNamespace(event=lambda *a: None, sample_ids=lambda *a: None, enabled=False),
    )


def epochs_until_stop(run: SimpleNamespace, vote: StopVote) -> tuple[str, int]:
    """`run_training`'s order: train, (validate, checkpoint), settle the epoch's votes."""
    batches = [(torch.randn(2, 4), torch.tensor([0, 1]), ["a", "b"]) for _ in range(STEPS)]
    for epoch in range(EPOCHS):
        if train_one_epoch(run, epoch, iter(batches), vote).stopped:
            return "mid-epoch", epoch + 1
        if vote.settle():
            return "after its checkpoint", epoch + 1
    return "never", EPOCHS


def _rank(rank: int, port: int, out: str) -> None:
    with gloo_group(rank, port):
        vote = StopVote(_Session(rank, 2, asks=rank == 0))
        result = epochs_until_stop(_tiny_run(2), vote)
        with open(f"{out}-{rank}.json", "w") as handle:
            json.dump(result, handle)


def test_a_stop_asked_in_epochs_shorter_than_a_check_ends_the_run_after_the_epoch(tmp_path):
    """Rank 0 is asked from the first step; rank 1 never is. Before, no vote ever started in
    3-step epochs: the run trained on, and Ctrl-C ended in a hard kill."""
    # Rank 0 runs in this process, rank 1 in a spawned one (`run_two_ranks` says why).
    run_two_ranks(_rank, free_port(), str(tmp_path / "rank"))
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [["after its checkpoint", 1]] * 2  # both ranks, the same epoch, saved


def test_one_rank_and_nothing_asked_trains_every_epoch():
    assert epochs_until_stop(_tiny_run(1), StopVote(_Session(0, 1, asks=False))) == (
        "never",
        EPOCHS,
    )
    assert epochs_until_stop(_tiny_run(1), StopVote(_Session(0, 1, asks=True))) == (
        "after its checkpoint",
        1,
    )


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: it checks that a vote never synchronises one (run it on a GPU "
    "machine; CI has none)",
)
def test_starting_a_vote_on_a_gpu_never_synchronises_it():
    """CUDA's sync debug mode raises on any call that makes the host wait for the device (a
    pageable host-to-device copy did, every check)."""
    vote = StopVote(_Session(0, 1, asks=True, device="cuda"))
    busy = torch.randn(2048, 2048, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            busy = busy @ busy / 2048  # queued work the vote must not wait for
        vote.close_epoch()
        vote.close_epoch()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert vote.settle() is True
    assert vote.settle() is False  # nothing left in flight
