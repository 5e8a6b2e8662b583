"""Validation metrics from counts added across ranks: two real gloo processes, each with its
half of a split, reach exactly the metrics of the whole split, binary tasks included (their
ROC/PR-AUC need every sample's score, gathered as N floats, not N x C)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attnpipe.metrics import MetricCounts, classification_metrics
from attnpipe.train.validation import reduce_counts
from tests.train.two_ranks import free_port, gloo_group, run_two_ranks

pytestmark = [pytest.mark.timing, pytest.mark.timeout(300)]  # two ranks: a collective timeout


def _split(classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(classes)
    labels = rng.integers(0, classes, 301)
    labels[:classes] = np.arange(classes)
    probs = rng.dirichlet(np.ones(classes), len(labels))
    return labels, probs


def _rank(rank: int, port: int, out: str) -> None:
    with gloo_group(rank, port):
        found = {}
        for classes in (2, 7):
            labels, probs = _split(classes)
            mine = slice(0, 120) if rank == 0 else slice(120, None)  # unequal shares
            counts = MetricCounts(classes, threshold=0.3)
            counts.add(labels[mine], probs[mine], np.log(probs[mine]).astype(np.float32))
            total = reduce_counts(counts, torch.device("cpu"))
            found[classes] = {"loss": total.loss(), "samples": total.samples, **total.metrics()}
        with open(f"{out}-{rank}.json", "w") as handle:
            json.dump(found, handle)


def test_two_ranks_reduce_counts_to_the_whole_splits_metrics(tmp_path):
    # Rank 0 runs in this process, rank 1 in a spawned one (`run_two_ranks` says why: a
    # forked child hung on a lock of the test process's threads, in the stop-vote test).
    run_two_ranks(_rank, free_port(), str(tmp_path / "rank"))
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # the same numbers on every rank
    for classes in (2, 7):
        labels, probs = _split(classes)
        got = ranks[0][str(classes)]
        assert got["samples"] == len(labels)
        expected = classification_metrics(labels, probs, threshold=0.3)
        if classes == 2:
            assert {"roc_auc", "pr_auc", "sensitivity"} <= set(got)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-12), (classes, key)
        picked = np.log(probs[np.arange(len(labels)), labels]).astype(np.float32)
        assert got["loss"] == pytest.approx(-picked.astype(np.float64).mean(), rel=1e-9)
