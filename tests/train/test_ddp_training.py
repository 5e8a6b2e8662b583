"""Two DDP workers on CPU (gloo) under a real Ray: disjoint data, exact validation from counts.

The run checked is the training stage of the digits pipeline that `dvc repro` built (the
session's `repro_project`), so these tests add no training of their own.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from attnpipe.config import load_recipe
from attnpipe.data.loaders import ShardStream, build_transform, make_loader, split_info
from attnpipe.metrics import classification_metrics, softmax
from attnpipe.modelfile import load_model_file
from attnpipe.paths import PipelinePaths
from tests.conftest import SECRET, ReproProject
from tests.wandb_offline import history_rows, offline_runs, run_config, summary

# Real Ray / DVC runs: minutes on an idle 2-core machine; the allowance covers a busy one.
pytestmark = [pytest.mark.ray, pytest.mark.dvc, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def trained(repro_project: ReproProject):
    """The training stage of the shared `dvc repro` build: 2 workers, traced, secrets planted."""
    root = repro_project.root
    return load_recipe("digits", root), PipelinePaths(root, "digits"), repro_project.trace


def test_ranks_trained_on_disjoint_samples(trained):
    recipe, _, trace = trained
    for epoch in range(1, recipe.train.epochs + 1):
        rank0 = (trace / f"epoch{epoch}-rank0.txt").read_text().split()
        rank1 = (trace / f"epoch{epoch}-rank1.txt").read_text().split()
        assert len(rank0) == len(rank1) > 0  # the same number of steps on both ranks
        assert not set(rank0) & set(rank1), f"epoch {epoch}: ranks shared samples"


def test_validation_metrics_equal_a_single_process_computation(trained):
    """One process, the same weights, every validation sample: the numbers the ranks reported.

    The process reads each rank's share with that rank's batches and one thread, as the
    workers did, so the logits are bit-identical; the metrics are then computed once over all
    samples. Averaging per-rank metrics (the classic mistake) would not match.
    """
    recipe, paths, _ = trained
    model, payload = load_model_file(paths.model_file)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    parts = [
        _logits_and_labels(
            model,
            ShardStream(
                urls=split_info(paths.shards, "val").urls,
                rank=rank,
                world_size=2,
                transform=build_transform(recipe.augment, recipe.model.input_size, train=False),
                train=False,
            ),
            recipe.evaluate.batch_size,
        )
        for rank in (0, 1)
    ]
    torch.set_num_threads(threads)
    logits = np.concatenate([logits for logits, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    assert len(labels) == 179  # every validation sample
    single = classification_metrics(labels, softmax(logits))
    single["loss"] = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits), torch.from_numpy(labels)
    ).item()
    reported = payload["metrics"]  # what the ranks computed at the best epoch, full precision
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "loss"):
        assert reported[f"val_{key}"] == pytest.approx(single[key], abs=1e-6), key
    with paths.train_history.open() as handle:  # the same numbers, to the CSV's 6 digits
        row = {int(r["epoch"]): r for r in csv.DictReader(handle)}[payload["epoch"]]
    for key, value in reported.items():
        assert float(row[key]) == pytest.approx(value, rel=1e-5), key
    assert float(row["val_macro_f1"]) == pytest.approx(single["macro_f1"], rel=1e-5)


def _logits_and_labels(model, stream, batch_size) -> tuple[np.ndarray, np.ndarray]:
    """Plain logits of every sample of `stream`, computed here without the package's
    prediction code: an independent check of what the ranks reported."""
    logits, labels = [], []
    with torch.no_grad():
        for images, batch_labels, _ in make_loader(stream, batch_size, workers=0):
            logits.append(model(images).numpy())
            labels.append(batch_labels.numpy())
    return np.concatenate(logits), np.concatenate(labels)


def test_model_file_loads_without_ray_and_names_its_classes(trained):
    _, paths, _ = trained
    payload = torch.load(paths.model_file, weights_only=True)
    assert payload["class_names"][0] == "zero" and payload["num_classes"] == 10
    assert payload["recipe"]["model"]["name"] == "attention56_cifar"
    model, _ = load_model_file(paths.model_file)
    logits = model(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 10) and np.isfinite(logits.detach().numpy()).all()


def test_offline_wandb_run_matches_the_history_file(trained):
    recipe, paths, _ = trained
    runs = [r for r in offline_runs(paths.root / "wandb") if r.info.job_type == "train"]
    assert len(runs) == 1  # two workers, one run (rank 0 only)
    records = runs[0].records
    rows = history_rows(records)
    with paths.train_history.open() as handle:
        expected = list(csv.DictReader(handle))
    assert len(rows) == len(expected) == recipe.train.epochs
    for logged, written in zip(rows, expected, strict=True):
        assert logged["epoch"] == int(written["epoch"])
        for key in ("train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr"):
            wandb_key = key.replace("_", "/", 1) if "_" in key else f"train/{key}"
            assert logged[wandb_key] == pytest.approx(float(written[key]), rel=1e-5), key
    # Images of the best model, logged at the end (W&B stores media as nested keys).
    assert any(key.startswith("val/attention_overlays/") for key in rows[-1])
    # The summary is the best epoch's (the weights in model.pt), not the last epoch's.
    payload = torch.load(paths.model_file, weights_only=True)
    best = next(r for r in expected if int(r["epoch"]) == payload["epoch"])
    values = summary(records)
    assert values["best/epoch"] == payload["epoch"]
    for key in ("val_accuracy", "val_loss"):
        wandb_key = key.replace("_", "/", 1)
        assert values[wandb_key] == pytest.approx(float(best[key]), rel=1e-5)
        assert values[f"best/{wandb_key}"] == values[wandb_key]
    config = run_config(records)
    assert config["model"]["name"] == "attention56_cifar"
    assert config["git_commit"] and config["data_version"].startswith(("dvc:", "index:"))


def test_no_secret_reaches_config_logs_or_checkpoints(trained):
    _, paths, _ = trained
    for path in paths.root.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"secret leaked into {path}"
