"""`evaluate` on a briefly trained digits model: every test image once, metrics that agree with
the per-sample rows, figures, and a self-contained report page."""

from __future__ import annotations

import base64
import csv
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from attnpipe.config import parse_recipe
from attnpipe.evaluate.run import EXAMPLES_PER_CLASS, run_split, split_images
from attnpipe.modelfile import load_model_file
from attnpipe.models import create_model, spatial_maps
from attnpipe.overlays import attention_examples, attention_overlays, overlay_strip
from tests.conftest import one_thread

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _rows(path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_every_test_image_is_scored_once_and_the_metrics_agree_with_the_rows(evaluated_project):
    paths, metrics = evaluated_project
    manifest = pq.read_table(paths.manifest, columns=["id", "split"]).to_pylist()
    test_ids = {row["id"] for row in manifest if row["split"] == "test"}
    saved = json.loads(paths.metrics.read_text())["test"]
    assert saved == pytest.approx(metrics)
    assert saved["test_samples"] == len(test_ids) == 361
    # The DVC metrics: the headline of the same numbers, a few columns.
    headline = json.loads(paths.test_summary.read_text())
    assert headline == {"test_accuracy": saved["accuracy"], "test_macro_f1": saved["macro_f1"]}

    rows = _rows(paths.confusion)
    assert [r["id"] for r in rows] == sorted(test_ids)  # each test image exactly once
    actual = np.array([DIGITS.index(r["actual"]) for r in rows])
    predicted = np.array([DIGITS.index(r["predicted"]) for r in rows])
    assert saved["accuracy"] == pytest.approx(np.mean(actual == predicted))
    recalls = [np.mean(predicted[actual == c] == c) for c in range(10)]
    assert saved["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert 0.1 < saved["accuracy"] < 1  # better than chance, with mistakes to show
    for key in ("macro_precision", "macro_recall", "macro_f1", "ece", "top5_accuracy"):
        assert 0 <= saved[key] <= 1, key
    assert "roc_auc" not in saved and "sensitivity" not in saved  # 10 classes, not binary

    per_class = _rows(paths.per_class)
    assert [r["class"] for r in per_class] == DIGITS
    for c, row in enumerate(per_class):
        assert int(row["support"]) == np.sum(actual == c)
        assert float(row["recall"]) == pytest.approx(recalls[c], abs=5e-5)
        hits = predicted == c
        precision = np.mean(actual[hits] == c) if hits.any() else 0.0
        assert float(row["precision"]) == pytest.approx(precision, abs=5e-5)
    assert saved["macro_recall"] == pytest.approx(np.mean(recalls))


def test_figures_are_pngs(evaluated_project):
    paths, _ = evaluated_project
    names = {p.name for p in paths.figures.glob("*.png")}
    assert names == {
        "confusion.png",
        "training_curves.png",
        "calibration.png",
        "attention_correct.png",
        "attention_wrong.png",
    }
    for name in names:
        with Image.open(paths.figures / name) as image:
            assert image.format == "PNG" and min(image.size) > 200, name


def test_report_page_is_self_contained_with_numbers_and_provenance(evaluated_project):
    paths, metrics = evaluated_project
    page = paths.report_html.read_text()
    # No request leaves the file: every image is a data URI, no external URL, no script.
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", page)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    inlined = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    on_disk = {p.read_bytes() for p in paths.figures.glob("*.png")}
    assert {base64.b64decode(x) for x in inlined} == on_disk
    # The numbers and the provenance of model.pt.
    card = re.search(r'id="metric-accuracy" data-value="([^"]+)".*?class="value">([^<]+)<', page)
    assert float(card.group(1)) == pytest.approx(metrics["accuracy"])
    assert card.group(2) == f"{100 * metrics['accuracy']:.2f}%"
    table = page[page.index('id="per-class"') :]
    table = table[: table.index("</table>")]
    assert [re.sub("<[^>]+>", "", c) for c in re.findall(r"<tr><td>(.*?)</td>", table)] == [
        *DIGITS,
        "macro average",
    ]
    _, payload = load_model_file(paths.model_file)
    for fact in (
        payload["git_commit"],
        payload["data_version"],
        payload["model_name"],
        payload["run_name"],
        "width_multiplier",  # the resolved recipe is shown
        "optimizer:",
    ):
        assert fact in page, fact


def test_report_shows_binary_metrics_at_the_threshold(tmp_path):
    """A binary task's page: ROC-AUC, PR-AUC, sensitivity and specificity at the threshold."""
    from attnpipe.evaluate.report import render_report
    from attnpipe.evaluate.run import SplitResult
    from attnpipe.metrics import classification_metrics, per_class_report

    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.3, 0.9])
    probs = np.stack([1 - p1, p1], axis=1)
    metrics = {"test_samples": 7, **classification_metrics(labels, probs, 0.3), "threshold": 0.3}
    page = render_report(
        pipeline="melanoma",
        metrics=metrics,
        per_class=per_class_report(labels, probs, ["benign", "malignant"], 0.3),
        predictions=SplitResult.from_probs(
            [f"img{i}" for i in range(7)], labels, probs, ["b", "m"], 0.3
        ),
        payload={
            "model_name": "attnvgg16",
            "input_size": 224,
            "class_names": ["benign", "malignant"],
            "recipe": {},
        },
        figures=[],
        threshold=0.3,
        flip_tta=True,
    )
    # threshold 0.3: predicted 0 1 1 1 1 1 1 -> sensitivity 3/3, specificity 1/4
    assert 'id="metric-sensitivity" data-value="1.0"' in page
    assert re.search(r'id="metric-specificity"[^>]*>.*?25\.00%.*?at threshold 0\.3', page)
    assert 'id="metric-roc-auc"' in page and 'id="metric-pr-auc"' in page
    assert "flip TTA on; threshold 0.3" in page
    assert "6 of 7 test images are misclassified" not in page  # 3 are: ids 1, 2, 3
    assert "3 of 7 test images are misclassified" in page


@pytest.fixture(scope="module")
def plain_scores(trained_project):
    """The test split scored by the recipe as it is (no TTA, float32, in-process reading): the
    reference of the flip-TTA and the bf16 tests, computed once for both (the same work)."""
    recipe, paths = trained_project
    model, payload = load_model_file(paths.model_file)
    with one_thread():
        return run_split(model, payload, recipe, paths, "test")


def test_flip_tta_averages_the_image_and_its_mirror(trained_project, plain_scores):
    recipe, paths = trained_project
    data = recipe.model_dump(mode="json")
    data["evaluate"] = {**data["evaluate"], "flip_tta": True}
    tta_recipe = parse_recipe({k: v for k, v in data.items() if k != "name"}, name="digits")
    model, payload = load_model_file(paths.model_file)
    plain = plain_scores  # the same scoring as the recipe's own, shared
    tta = run_split(model, payload, tta_recipe, paths, "test")
    assert tta.ids == plain.ids == sorted(plain.ids)
    # By hand on the first test images: the mean of the softmax of the image and of its
    # mirror, at the true class and at the predicted one.
    images, ids = _first_test_images(recipe, paths, payload["input_size"], 8)
    with torch.no_grad():
        once = model(images).softmax(1)
        mirrored = model(images.flip(-1)).softmax(1)
    both = (once + mirrored) / 2
    rows = [plain.ids.index(i) for i in ids]
    labels = plain.labels[rows]
    for result, probs in ((plain, once), (tta, both)):
        expected = probs.numpy()
        np.testing.assert_allclose(result.true_prob[rows], expected[range(8), labels], atol=1e-6)
        np.testing.assert_array_equal(result.predicted[rows], expected.argmax(1))
        np.testing.assert_allclose(result.confidence[rows], expected.max(1), atol=1e-6)
    assert not np.allclose(tta.true_prob, plain.true_prob, atol=1e-3)


def _first_test_images(recipe, paths, input_size: int, count: int):
    """The first `count` test images in shard order, transformed as evaluation does, and ids."""
    from attnpipe.data.loaders import ShardStream, build_transform, make_loader, split_info

    info = split_info(paths.shards, "test")
    transform = build_transform(recipe.augment, input_size, train=False)
    stream = ShardStream(info.shards, rank=0, world_size=1, transform=transform, train=False)
    images, _, ids = next(iter(make_loader(stream, count)))
    return images, list(ids)


def test_attention_overlay_blends_the_map_where_it_is_high():
    image = np.zeros((32, 32, 3), np.uint8)
    hot_top_left = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    original, blended = attention_overlays(image, {"a": hot_top_left}, alpha=0.5, min_side=64)
    assert original.shape == (64, 64, 3) and not original.any()  # upscaled x2, still black
    ((name, tile),) = blended
    assert name == "a" and tile.shape == (64, 64, 3)
    # A black image: the blend is half the colour map, its top where the map is high.
    turbo = colormaps["turbo"]
    hot, cold = (np.array(turbo(v)[:3]) * 255 * 0.5 for v in (1.0, 0.0))
    np.testing.assert_allclose(tile[0, 0], hot, atol=1)
    np.testing.assert_allclose(tile[-1, -1], cold, atol=1)
    # Channel weights (N x C) are not spatial: not drawn.
    maps = {"mask": torch.rand(2, 1, 8, 8), "channels": torch.rand(2, 64)}
    assert list(spatial_maps(maps)) == ["mask"] and spatial_maps(maps)["mask"].shape == (2, 8, 8)
    strip = overlay_strip(image, {"a": hot_top_left, "b": hot_top_left.T})
    assert strip.shape == (128, 3 * 128 + 2 * 4, 3)


def test_attention_examples_for_wandb(trained_project):
    """What the training loop logs to W&B: a strip per image and a caption naming the classes."""
    recipe, paths = trained_project
    model, payload = load_model_file(paths.model_file)
    images = split_images(recipe, paths, payload["input_size"], 4)
    labels = [1, 2, 3, 4]
    logged = attention_examples(
        model, images, labels, payload["class_names"], payload["mean"], payload["std"], limit=3
    )
    assert len(logged) == 3
    for (strip, caption), label in zip(logged, labels, strict=False):
        assert strip.dtype == np.uint8 and strip.shape[0] == 128
        assert strip.shape[1] == 4 * 128 + 3 * 4  # the input and attention56's three maps
        assert caption.startswith(f"true {DIGITS[label]}, predicted ")
        assert "stage1.0, stage2.0, stage3.0" in caption
    assert model.training is False
    named = attention_examples(
        model, images, labels, payload["class_names"], payload["mean"], payload["std"], ids="wxyz"
    )
    assert [caption.split(": true ")[0] for _, caption in named] == list("wxyz")


def test_resnet_family_models_are_drawn_through_class_activation_maps():
    """No attention module with a layout, so the CAM is what W&B shows; at 32 px the last
    feature map is a single cell, which has nothing to draw."""
    torch.manual_seed(0)
    model = create_model("streamlined_resnet18", num_classes=3)
    logged = attention_examples(
        model, torch.randn(2, 3, 64, 64), [0, 2], ["a", "b", "c"], [0.5] * 3, [0.5] * 3
    )
    assert len(logged) == 2 and all(caption.endswith("maps: cam") for _, caption in logged)
    tiny = attention_examples(
        model, torch.randn(2, 3, 32, 32), [0, 2], ["a", "b", "c"], [0.5] * 3, [0.5] * 3
    )
    assert tiny == []


def test_report_of_a_resnet_family_model_has_attention_overlays(trained_project, tmp_path):
    """Every registry model gets overlays in its report: here an SE-ResNet-18 at 64 px."""
    from attnpipe.config import apply_overrides
    from attnpipe.evaluate.run import evaluate
    from attnpipe.modelfile import Provenance, write_model_file
    from tests.evaluate.conftest import copy_project

    recipe, source = trained_project
    paths = copy_project(source, tmp_path)
    recipe = apply_overrides(
        recipe, {"model": {"name": "se_resnet18", "input_size": 64, "kwargs": {}}}, "test"
    )
    torch.manual_seed(0)
    model = create_model("se_resnet18", num_classes=10)
    write_model_file(
        paths.model_file, recipe, model.state_dict(), DIGITS, Provenance(1, {}, "x", "y", "z")
    )
    with one_thread():
        evaluate(recipe, paths)
    drawn = {p.stem for p in paths.figures.glob("attention_*.png")}
    assert drawn, sorted(p.name for p in paths.figures.iterdir())
    assert "Attention:" in paths.report_html.read_text()


def test_overlay_examples_are_right_and_wrong_ones_per_class(evaluated_project, trained_project):
    recipe, paths = trained_project
    model, payload = load_model_file(paths.model_file)
    predictions = run_split(model, payload, recipe, paths, "test", EXAMPLES_PER_CLASS)
    by_kind: dict[tuple[int, bool], int] = {}
    for c in predictions.candidates:
        key = (c.label, c.label == c.predicted)
        by_kind[key] = by_kind.get(key, 0) + 1
        assert c.pixels.shape == (32, 32, 3)
    assert max(by_kind.values()) <= EXAMPLES_PER_CLASS
    assert any(ok for _, ok in by_kind) and any(not ok for _, ok in by_kind)


def test_evaluate_runs_on_the_gpu_when_there_is_one_and_never_quietly_on_the_cpu():
    from attnpipe.devices import DeviceError
    from attnpipe.evaluate.run import evaluation_device

    assert evaluation_device("cpu").type == "cpu"
    auto = evaluation_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match=r"evaluate\.device is cuda: no NVIDIA driver"):
            evaluation_device("cuda")


def test_evaluate_scores_with_the_recipes_amp_memory_format_and_loader_workers(
    trained_project, plain_scores
):
    """`train.amp: bf16`, `channels_last: true` and 2 loader workers reach evaluate (on this CPU:
    autocast to bfloat16 changes the probabilities a little, not the answers much), and the
    2 readers still give every test sample once."""
    from attnpipe.config import apply_overrides

    recipe, paths = trained_project
    model, payload = load_model_file(paths.model_file)
    plain = plain_scores  # the same scoring as the recipe's own, shared
    fast = apply_overrides(
        recipe, {"train.amp": "bf16", "train.channels_last": True, "train.loader_workers": 2}, "t"
    )
    seen: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    try:
        mixed = run_split(model, payload, fast, paths, "test")
    finally:
        hook.remove()
    assert mixed.ids == plain.ids and len(set(mixed.ids)) == len(plain.ids)
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x in seen)
    assert not np.array_equal(mixed.true_prob, plain.true_prob)  # bf16 did run
    np.testing.assert_allclose(mixed.true_prob, plain.true_prob, atol=0.1)
    assert (mixed.predicted == plain.predicted).mean() > 0.9
