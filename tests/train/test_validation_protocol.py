"""Validation measures what the test measures (issue 28): the evaluation's resize and centre
crop (`evaluate.image_size`, `evaluate.crop_ratio`), and under mixed precision float32 logits.
The validation function and the test's scoring function run here, in-process, on the same
weights and images."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from attnpipe.config import apply_overrides
from attnpipe.data.loaders import split_info
from attnpipe.data.transforms import evaluation_size
from attnpipe.evaluate.scoring import score_share
from attnpipe.models import AttentionAPI
from attnpipe.predictions import class_log_probabilities
from attnpipe.train.build import build
from attnpipe.train.launch import build_loop_config
from attnpipe.train.validation import validate


class _OneRank:
    rank, world_size, node_id = 0, 1, "local"
    device = torch.device("cpu")

    def prepare_model(self, model: nn.Module, forward_sync_buffers: bool = True) -> nn.Module:
        return model

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        yield None

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        pass

    def stop_requested(self) -> bool:
        return False


def test_validation_and_the_test_score_the_same_weights_alike(digits_project):
    """Trained at 16 px, evaluated at 32 with ImageNet's crop ratio and bf16: validation used
    to feed 16 px at crop ratio 1.0, and so chose the best epoch by another measure."""
    recipe, paths = digits_project
    changes = {
        "evaluate.image_size": 32,
        "evaluate.crop_ratio": 0.875,
        "train.amp": "bf16",
        "train.workers": 1,
        "tracking.wandb.mode": "disabled",
    }
    config = build_loop_config(apply_overrides(recipe, changes, origin="test"), paths)
    threads = torch.get_num_threads()
    try:
        run = build(config, _OneRank())
        validated = validate(run)
        info = split_info(config.shards, "val")
        size = evaluation_size(config.recipe, config.recipe.model.input_size)
        tested = score_share(
            run.eval_model, config.recipe, info.shards, run.classes, size, device=run.device
        )
        images = next(iter(run.val_loader))[0]
    finally:
        torch.set_num_threads(threads)
    assert size == 32 and images.shape[-2:] == (32, 32)
    assert tested.counts.samples == info.samples
    assert validated == pytest.approx({"loss": tested.counts.loss(), **tested.counts.metrics()})


class _Head(AttentionAPI, nn.Module):
    """Features that bf16 holds exactly; a head whose two logits, 100.0 and 100.125, bf16
    cannot tell apart (its step there is 0.5)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 2)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[1.0], [1.0]]))
            self.linear.bias.copy_(torch.tensor([0.0, 0.125]))

    def _features(self, x: Tensor, maps: object) -> Tensor:
        return x.flatten(1)[:, :1]

    def forward_head(self, feats: Tensor) -> Tensor:
        return self.linear(feats)


def test_under_bf16_the_logits_are_float32():
    model = _Head().eval()
    images = torch.full((1, 1, 1, 1), 100.0)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        probs = class_log_probabilities(model, images)[0].exp()
        bf16 = model(images)  # what the whole network gives under autocast
    assert bf16.dtype == torch.bfloat16 and bf16[0, 0] == bf16[0, 1]  # a tie
    assert probs.dtype == torch.float32
    expected = torch.tensor([100.0, 100.125]).softmax(0)
    assert torch.allclose(probs, expected, atol=1e-6)  # class 1 wins, as in float32
