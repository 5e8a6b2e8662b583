"""bench_scale.py's metrics part: validation and evaluation metrics at ImageNet size.

Validation, per rank of `--ranks` simulated ranks (every rank does the same work, so one rank
is measured, in a fresh process):
- baseline (before): the rank's predictions (ids, labels, N/R x C float32 log-probabilities)
  go to every rank (`all_gather_object`: pickled, received, unpickled); every rank then holds
  all N x C, turns them into float64 probabilities and computes every metric with sklearn;
- now: the rank adds its batches into `MetricCounts` (confusion matrix, top-5 hits,
  calibration bins, loss sum), the ranks add their count vectors (an all-reduce of
  C x C + 47 float64), and the metrics come from the totals.

Evaluation, one process over the whole split: the baseline keeps every batch's log-probabilities,
concatenates them and computes the metrics, per-class table and confusion matrix from N x C
float64 probabilities; now `SplitScorer` streams the batches (counts plus four numbers per
sample).

The model's outputs (random logits, log-softmaxed) are made before the measured phase; what
the other ranks send (baseline: their pickled predictions; now: their count vectors) is made
before it too, as if just received. Memory is the peak resident set during the phase above
the resident set when it starts (Linux: /proc/self/clear_refs resets the peak).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn import metrics as skm  # imported before any measured phase, by both ways

BATCH = 250


@dataclass(frozen=True)
class Predictions:
    """What every rank gathered before (attnpipe.predictions.Predictions, now gone)."""

    ids: list[str]
    labels: np.ndarray
    log_probs: np.ndarray

    @property
    def probs(self) -> np.ndarray:
        return np.exp(self.log_probs.astype(np.float64))

    def loss(self) -> float:
        picked = self.log_probs[np.arange(len(self.labels)), self.labels]
        return float(-picked.astype(np.float64).mean())

    @classmethod
    def concatenate(cls, parts: list[Predictions]) -> Predictions:
        return cls(
            [i for p in parts for i in p.ids],
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.log_probs for p in parts]),
        )


def _rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _peak_mb() -> float:
    return _status_kb("VmHWM") / 1024


def _batches(samples: int, classes: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(labels, float32 log-probabilities) batches of a model that is right about 3/4 of the
    time: the true class's logit is raised, so the metrics are not all at chance."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, samples, BATCH):
        n = min(BATCH, samples - start)
        labels = rng.integers(0, classes, n)
        logits = rng.standard_normal((n, classes), dtype=np.float32)
        logits[np.arange(n), labels] += 4.0
        out.append((labels, torch.from_numpy(logits).log_softmax(1).numpy()))
    return out


def old_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict:
    """metrics.py before streaming (sklearn on the whole N x C matrix): the baseline."""
    classes = np.arange(probs.shape[1])
    predicted = probs.argmax(axis=1)
    result = {
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "balanced_accuracy": float(
            skm.recall_score(
                labels, predicted, labels=np.unique(labels), average="macro", zero_division=0
            )
        ),
    }
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        labels, predicted, labels=classes, average="macro", zero_division=0
    )
    result.update(macro_precision=precision, macro_recall=recall, macro_f1=f1)
    confidence = probs.max(axis=1)
    correct = (predicted == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, 16)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, 14)
    counts = np.bincount(which, minlength=15)
    with np.errstate(invalid="ignore", divide="ignore"):
        gaps = np.abs(
            np.bincount(which, weights=correct, minlength=15) / counts
            - np.bincount(which, weights=confidence, minlength=15) / counts
        )
    result["ece"] = float(np.nansum(counts / counts.sum() * gaps))
    result["top5_accuracy"] = float(skm.top_k_accuracy_score(labels, probs, k=5, labels=classes))
    return result


def _validation_baseline(samples: int, classes: int, ranks: int) -> dict:
    share = samples // ranks
    mine = _batches(share, classes, seed=0)
    received = [
        pickle.dumps(_predictions(_batches(share, classes, seed=r), r)) for r in range(1, ranks)
    ]
    wire_mb = sum(len(b) for b in received) / 2**20
    rss, _ = _rss_mb(), _reset_peak()
    started = time.perf_counter()
    local = _predictions(mine, 0)
    sent = pickle.dumps(local)  # all_gather_object pickles this rank's part too
    parts = [pickle.loads(sent)] + [pickle.loads(b) for b in received]
    gathered = Predictions.concatenate(parts)
    metrics = old_metrics(gathered.labels, gathered.probs)
    metrics["loss"] = gathered.loss()
    seconds = time.perf_counter() - started
    peak = _peak_mb() - rss
    return {"seconds": seconds, "peak_mb": peak, "received_mb": wire_mb, **_acc(metrics)}


def _predictions(batches, rank: int):
    labels = np.concatenate([b[0] for b in batches])
    ids = [f"r{rank}-{i:07d}" for i in range(len(labels))]
    return Predictions(ids, labels, np.concatenate([b[1] for b in batches]))


def _validation_streamed(samples: int, classes: int, ranks: int) -> dict:
    from attnpipe.metrics import MetricCounts

    share = samples // ranks
    mine = _batches(share, classes, seed=0)
    vector_size = MetricCounts(classes).to_vector().size
    received = [np.random.default_rng(r).random(vector_size) for r in range(1, ranks)]
    rss, _ = _rss_mb(), _reset_peak()
    started = time.perf_counter()
    counts = MetricCounts(classes)
    for labels, log_probs in mine:
        counts.add(labels, np.exp(log_probs.astype(np.float64)), log_probs)
    total = counts.to_vector()
    for vector in received:  # the all-reduce's sum
        total = total + vector
    counts.from_vector(total)
    counts.metrics()
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "peak_mb": _peak_mb() - rss,
        "received_mb": (ranks - 1) * vector_size * 8 / 2**20,
    }


def _evaluation_baseline(samples: int, classes: int) -> dict:
    batches = _batches(samples, classes, seed=0)
    rss, _ = _rss_mb(), _reset_peak()
    started = time.perf_counter()
    scored = Predictions(
        [f"{i:07d}" for i in range(samples)],
        np.concatenate([b[0] for b in batches]),
        np.concatenate([b[1] for b in batches]),
    )
    probs = scored.probs
    metrics = old_metrics(scored.labels, probs)
    predicted = probs.argmax(axis=1)
    skm.confusion_matrix(scored.labels, predicted, labels=np.arange(classes))
    skm.precision_recall_fscore_support(
        scored.labels, predicted, labels=np.arange(classes), zero_division=0
    )
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_mb": _peak_mb() - rss, **_acc(metrics)}


def _evaluation_streamed(samples: int, classes: int) -> dict:
    from attnpipe.evaluate.scoring import SplitScorer

    batches = _batches(samples, classes, seed=0)
    names = [f"c{i}" for i in range(classes)]
    no_images = torch.zeros(0)
    rss, _ = _rss_mb(), _reset_peak()
    started = time.perf_counter()
    scorer = SplitScorer(names, 0.5)
    for start, (labels, log_probs) in zip(range(0, samples, BATCH), batches, strict=True):
        ids = [f"{i:07d}" for i in range(start, start + len(labels))]
        scorer.add(no_images, torch.from_numpy(labels), ids, torch.from_numpy(log_probs))
    result = scorer.result()
    metrics = result.counts.metrics()
    result.counts.per_class(names)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_mb": _peak_mb() - rss, **_acc(metrics)}


def _acc(metrics: dict) -> dict:
    return {"accuracy": metrics["accuracy"], "top5": metrics["top5_accuracy"]}


CASES = {
    "validation-baseline": lambda a: _validation_baseline(a.samples, a.classes, a.ranks),
    "validation-streamed": lambda a: _validation_streamed(a.samples, a.classes, a.ranks),
    "evaluation-baseline": lambda a: _evaluation_baseline(a.samples, a.classes),
    "evaluation-streamed": lambda a: _evaluation_streamed(a.samples, a.classes),
}


def run_case(case: str, samples: int, classes: int, ranks: int) -> dict:
    """One measurement in a fresh process (so one case's memory never counts in another's)."""
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            case,
            str(samples),
            str(classes),
            str(ranks),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def metrics_report(samples: int, classes: int, ranks: int, repeats: int) -> str:
    """The markdown table of the metrics part (medians of `repeats` alternating runs)."""
    rows = []
    for kind in ("validation", "evaluation"):
        runs: dict[str, list[dict]] = {"baseline": [], "streamed": []}
        for _ in range(repeats):
            for way in runs:
                runs[way].append(run_case(f"{kind}-{way}", samples, classes, ranks))
        base, now = (_median(runs["baseline"]), _median(runs["streamed"]))
        scope = f"per rank of {ranks}" if kind == "validation" else "one process"
        before = "before: all-gather, N x C float64" if kind == "validation" else "before: N x C"
        for way, m in ((before, base), ("now: streamed counts", now)):
            received = f"{m['received_mb']:.1f}" if "received_mb" in m else "-"
            rows.append(
                f"| {kind} ({scope}) | {way} | {m['seconds']:.2f} | {m['peak_mb']:.0f} | "
                f"{received} | {base['seconds'] / m['seconds']:.1f}x | "
                f"{base['peak_mb'] / max(m['peak_mb'], 0.1):.0f}x |"
            )
    header = (
        f"{samples:,} samples x {classes:,} classes, {ranks} simulated ranks, batches of "
        f"{BATCH}\n\n| metrics | way | seconds | peak MB above start | received MB | "
        "speed vs before | memory vs before |\n|---|---|---:|---:|---:|---:|---:|"
    )
    return header + "\n" + "\n".join(rows)


def _median(runs: list[dict]) -> dict:
    return {key: float(np.median([r[key] for r in runs])) for key in runs[0]}


if __name__ == "__main__":
    case, samples, classes, ranks = sys.argv[1], *map(int, sys.argv[2:5])
    torch.set_num_threads(1)
    args = type("Args", (), {"samples": samples, "classes": classes, "ranks": ranks})
    print(json.dumps(CASES[case](args)))
