"""A trained digits model, in-process and without Ray, for the evaluate/export/predict tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from attnpipe.config import Recipe, load_recipe
from attnpipe.data.loaders import ShardStream, build_transform, make_loader, split_info
from attnpipe.paths import PipelinePaths
from tests.conftest import TINY_OVERRIDES, one_thread, write_project

STEPS_PER_EPOCH = 12
EPOCHS = 2
# The demo's 32 pixels: this model is trained in-process in seconds, and the report, export
# and prediction tests read images and overlays at the size a real pipeline gives them.
EVALUATED_OVERRIDES = {**TINY_OVERRIDES, "model": {**TINY_OVERRIDES["model"], "input_size": 32}}


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _train_briefly(recipe: Recipe, paths: PipelinePaths) -> tuple[torch.nn.Module, list[dict]]:
    """A few Adam steps on the train shards: enough for clearly-better-than-chance predictions
    (so the report has right and wrong examples), seconds on two cores."""
    from attnpipe.metrics import classification_metrics
    from attnpipe.models import create_model

    torch.manual_seed(0)
    train, val = split_info(paths.shards, "train"), split_info(paths.shards, "val")
    model = create_model(recipe.model.name, num_classes=len(train.classes), **recipe.model.kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = ShardStream(
        urls=train.urls,
        rank=0,
        world_size=1,
        transform=build_transform(recipe.augment, recipe.model.input_size, train=True),
        train=True,
        shuffle_buffer=300,
    )
    val_stream = ShardStream(
        urls=val.urls,
        rank=0,
        world_size=1,
        transform=build_transform(recipe.augment, recipe.model.input_size, train=False),
        train=False,
    )
    history = []
    batches = iter(make_loader(stream, 32, workers=0))
    for epoch in range(1, EPOCHS + 1):
        model.train()
        losses = []
        for _ in range(STEPS_PER_EPOCH):
            images, labels, _ = next(batches)
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        logits, targets = [], []
        with torch.no_grad():
            for images, labels, _ in make_loader(val_stream, 128, workers=0):
                logits.append(model(images))
                targets.append(labels)
        logit = torch.cat(logits)
        target = torch.cat(targets)
        scores = classification_metrics(target.numpy(), logit.softmax(1).numpy())
        history.append(
            {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "lr": 3e-3,
                "val_loss": torch.nn.functional.cross_entropy(logit, target).item(),
                **{f"val_{k}": v for k, v in scores.items()},
            }
        )
    return model.eval(), history


@pytest.fixture(scope="session")
def trained_project(
    digits_project: tuple[Recipe, PipelinePaths], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Recipe, PipelinePaths]:
    """The shared digits shards (linked, read-only) plus models/digits/model.pt and
    reports/digits/train_history.csv of a briefly trained model; evaluate not run yet."""
    from attnpipe.modelfile import Provenance, write_model_file
    from attnpipe.tracking import write_history

    _, shared = digits_project
    root = write_project(tmp_path_factory.mktemp("trained"), EVALUATED_OVERRIDES)
    (root / "data").mkdir()
    (root / "data" / "digits").symlink_to(shared.data, target_is_directory=True)
    recipe = load_recipe("digits", root)
    paths = PipelinePaths(root, "digits")
    started = time.perf_counter()
    with one_thread():
        model, history = _train_briefly(recipe, paths)
    print(f"trained the test model in {time.perf_counter() - started:.1f}s")
    write_model_file(
        paths.model_file,
        recipe=recipe,
        state_dict=model.state_dict(),
        class_names=split_info(paths.shards, "test").classes,
        provenance=Provenance(
            epoch=EPOCHS,
            metrics={k: v for k, v in history[-1].items() if k.startswith("val_")},
            git_commit="0123456789abcdef0123456789abcdef01234567",
            data_version="index:test",
            run_name="digits-test",
        ),
    )
    write_history(paths.train_history, history)
    return recipe, paths


def copy_project(source: PipelinePaths, target_root: Path) -> PipelinePaths:
    """A private copy of a trained project's pipeline, model and reports (data stays linked)."""
    import shutil

    for item in ("pipelines", "models", "reports", "dvc.yaml", "params.yaml"):
        path = source.root / item
        if path.is_dir():
            shutil.copytree(path, target_root / item)
        elif path.exists():
            shutil.copy(path, target_root / item)
    (target_root / "data").mkdir(exist_ok=True)
    (target_root / "data" / "digits").symlink_to(source.data.resolve(), target_is_directory=True)
    return PipelinePaths(target_root, source.name)


@pytest.fixture(scope="session")
def evaluated_project(trained_project: tuple[Recipe, PipelinePaths]) -> tuple[PipelinePaths, dict]:
    """`trained_project` after `evaluate` (metrics, figures, index.html); read-only."""
    from attnpipe.evaluate.run import evaluate

    recipe, paths = trained_project
    with one_thread():
        metrics = evaluate(recipe, paths)
    return paths, metrics


# Debian's Chromium (`make browser` installs it): Playwright's own browser download is not
# reachable from these machines, so Playwright drives this one.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_or_install_chromium() -> tuple[str | None, str]:
    """(path, why not): a Chromium on PATH, else `apt-get install chromium` once as root."""
    found = next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if found:
        return found, ""
    if os.name != "posix" or os.geteuid() != 0:
        return None, "no Chromium installed, and not root to apt-get install it"
    if not shutil.which("apt-get"):
        return None, "no Chromium installed, and no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as error:
            return None, f"no Chromium: `{' '.join(command)}` failed ({error})"
        if done.returncode != 0 and command[1] == "install":
            return None, f"no Chromium: apt-get install chromium failed: {done.stderr[-400:]}"
    found = shutil.which("chromium")
    return (found, "") if found else (None, "apt-get ran but no chromium binary appeared")


@pytest.fixture(scope="session")
def chromium() -> str:
    """A headless Chromium, installed with apt-get (as root) if missing; else the test skips."""
    binary, why_not = find_or_install_chromium()
    if binary is None:
        pytest.skip(f"{why_not}; `make browser` installs it on Debian/Ubuntu")
    return binary


@pytest.fixture(scope="session")
def exported_project(trained_project: tuple[Recipe, PipelinePaths]):
    """`trained_project` with models/digits/model.onnx from `export` (verified on 8 images)."""
    from attnpipe.evaluate.export import export

    recipe, paths = trained_project
    with one_thread():
        result = export(recipe, paths, samples=8)
    return paths, result
