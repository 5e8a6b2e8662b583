"""Scoring a split, or one worker's share of it: streamed metric counts plus the few per-sample
values the report needs (each sample's id, true and predicted class and two probabilities),
never an N x C probability matrix.

The same function scores the whole split in one process and a share on each Ray worker
(`attnpipe.evaluate.cluster`); the shares' results merge into exactly what one process gets:
the counts add up, the per-sample values are sorted by id, and the attention examples are
chosen by a rule that does not depend on the order the samples come in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from attnpipe.config import Recipe
from attnpipe.data.loaders import ShardStream, make_loader
from attnpipe.data.shard_index import ShardEntry
from attnpipe.data.transforms import evaluation_transform
from attnpipe.devices import memory_format_for, resolve_amp
from attnpipe.metrics import MetricCounts, predict_classes
from attnpipe.overlays import denormalize
from attnpipe.predictions import add_batch, iter_predictions

# Attention overlays: up to this many correct and this many wrong test images per class...
EXAMPLES_PER_CLASS = 2
# ...for at most this many classes per figure.
MAX_EXAMPLE_CLASSES = 10


@dataclass(frozen=True)
class Candidate:
    sample_id: str
    pixels: np.ndarray  # uint8 (H, W, 3): the transformed input
    label: int
    predicted: int
    confidence: float

    def rank(self) -> tuple[float, str]:
        """Most confident first; ties by id (the same choice whatever the sample order)."""
        return (-self.confidence, self.sample_id)


@dataclass(frozen=True)
class SplitResult:
    """A split scored by the model: every sample once, sorted by id."""

    ids: list[str]
    labels: np.ndarray  # (N,) int64
    predicted: np.ndarray  # (N,) int64, by the decision rule (`predict_classes`)
    confidence: np.ndarray  # (N,) float32: probability of the predicted class
    true_prob: np.ndarray  # (N,) float32: probability of the true class
    class_names: list[str]
    counts: MetricCounts
    correct_examples: list[Candidate] = field(default_factory=list)
    wrong_examples: list[Candidate] = field(default_factory=list)
    examples_per_class: int = 0
    shares: tuple[int, ...] = ()  # samples scored by each worker, in rank order

    @property
    def candidates(self) -> list[Candidate]:
        return self.correct_examples + self.wrong_examples

    @classmethod
    def from_probs(
        cls,
        ids: Sequence[str],
        labels: np.ndarray,
        probs: np.ndarray,
        class_names: list[str],
        threshold: float = 0.5,
    ) -> SplitResult:
        """A result from a whole N x C probability matrix (small inputs, tests)."""
        scorer = SplitScorer(class_names, threshold)
        scorer.add_probs(list(ids), np.asarray(labels), np.asarray(probs, np.float64))
        return scorer.result()

    @classmethod
    def merge(cls, parts: Sequence[SplitResult]) -> SplitResult:
        """The shares of several workers as one result (what one process would have got)."""
        first = parts[0]
        counts = MetricCounts(first.counts.num_classes, first.counts.threshold)
        for part in parts:
            counts.merge(part.counts)
        ids = [i for p in parts for i in p.ids]
        order = np.argsort(np.asarray(ids, dtype=object), kind="stable") if ids else []
        per_sample = {
            key: np.concatenate([getattr(p, key) for p in parts])[order]
            for key in ("labels", "predicted", "confidence", "true_prob")
        }
        keeper = ExampleKeeper(first.examples_per_class)
        for part in parts:
            keeper.add(part.candidates)
        return cls(
            [ids[i] for i in order],
            class_names=first.class_names,
            counts=counts,
            correct_examples=keeper.correct,
            wrong_examples=keeper.wrong,
            examples_per_class=first.examples_per_class,
            shares=tuple(n for p in parts for n in p.shares),
            **per_sample,
        )


class ExampleKeeper:
    """The attention figures' examples, chosen the same whatever order the samples come in:
    correct: the `per_class` most confident correct predictions of each of the first
    `max_classes` classes that have any; wrong: the `per_class x max_classes` most confident
    mistakes, at most `per_class` of one true class. Only the current choice is kept, so at
    most 2 x per_class x max_classes images are held (a candidate that drops out of the choice
    can never come back: later samples only raise the bar)."""

    def __init__(self, per_class: int, max_classes: int = MAX_EXAMPLE_CLASSES) -> None:
        self.per_class, self.max_classes = per_class, max_classes
        self.correct: list[Candidate] = []
        self.wrong: list[Candidate] = []

    def wants(self, label: int, correct: bool, confidence: float, sample_id: str) -> bool:
        """A cheap pre-check: could this sample enter the choice? (Avoids copying pixels.)"""
        if not self.per_class:
            return False
        kept = self.correct if correct else self.wrong
        if correct:
            classes = sorted({c.label for c in kept})
            return len(classes) < self.max_classes or label <= classes[-1]
        if len(kept) < self.per_class * self.max_classes:
            return True
        return (-confidence, sample_id) < kept[-1].rank()

    def add(self, candidates: Sequence[Candidate]) -> None:
        correct = self.correct + [c for c in candidates if c.label == c.predicted]
        wrong = self.wrong + [c for c in candidates if c.label != c.predicted]
        self.correct = self._choose_correct(correct)
        self.wrong = self._choose_wrong(wrong)

    def _choose_correct(self, candidates: list[Candidate]) -> list[Candidate]:
        by_class: dict[int, list[Candidate]] = {}
        for candidate in sorted(candidates, key=Candidate.rank):
            by_class.setdefault(candidate.label, []).append(candidate)
        classes = sorted(by_class)[: self.max_classes]
        return [c for label in classes for c in by_class[label][: self.per_class]]

    def _choose_wrong(self, candidates: list[Candidate]) -> list[Candidate]:
        chosen: list[Candidate] = []
        per_label: dict[int, int] = {}
        for candidate in sorted(candidates, key=Candidate.rank):
            if per_label.get(candidate.label, 0) < self.per_class:
                per_label[candidate.label] = per_label.get(candidate.label, 0) + 1
                chosen.append(candidate)
        return chosen[: self.per_class * self.max_classes]


class SplitScorer:
    """Takes scored batches; `result()` is the split (or share) as a `SplitResult`."""

    def __init__(
        self,
        class_names: list[str],
        threshold: float,
        examples_per_class: int = 0,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> None:
        self.class_names, self.threshold = class_names, threshold
        self.counts = MetricCounts(len(class_names), threshold)
        self.examples = ExampleKeeper(examples_per_class)
        self.mean, self.std = mean, std
        self.ids: list[str] = []
        self.parts: dict[str, list[np.ndarray]] = {
            "labels": [],
            "predicted": [],
            "confidence": [],
            "true_prob": [],
        }

    def add(
        self, images: torch.Tensor, labels: torch.Tensor, ids: list[str], log_probs: torch.Tensor
    ) -> None:
        probs = add_batch(self.counts, labels, log_probs)
        predicted = self._keep(list(ids), labels.cpu().numpy(), probs)
        self._offer_examples(images, list(ids), labels.cpu().numpy(), predicted, probs)

    def add_probs(self, ids: list[str], labels: np.ndarray, probs: np.ndarray) -> None:
        self.counts.add(labels, probs)
        self._keep(ids, labels, probs)

    def _keep(self, ids: list[str], labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
        predicted = predict_classes(probs, self.threshold)
        rows = np.arange(len(labels))
        self.ids += ids
        self.parts["labels"].append(labels.astype(np.int64))
        self.parts["predicted"].append(predicted.astype(np.int64))
        self.parts["confidence"].append(probs[rows, predicted].astype(np.float32))
        self.parts["true_prob"].append(probs[rows, labels].astype(np.float32))
        return predicted

    def _offer_examples(
        self,
        images: torch.Tensor,
        ids: list[str],
        labels: np.ndarray,
        predicted: np.ndarray,
        probs: np.ndarray,
    ) -> None:
        confidence = probs[np.arange(len(labels)), predicted]
        wanted = [
            i
            for i in range(len(ids))
            if self.examples.wants(
                int(labels[i]), bool(labels[i] == predicted[i]), float(confidence[i]), ids[i]
            )
        ]
        if not wanted:
            return
        pixels = denormalize(images[wanted], self.mean, self.std)
        self.examples.add(
            [
                Candidate(
                    ids[i], pixels[row], int(labels[i]), int(predicted[i]), float(confidence[i])
                )
                for row, i in enumerate(wanted)
            ]
        )

    def result(self) -> SplitResult:
        empty = {"labels": np.int64, "predicted": np.int64}
        arrays = {
            key: np.concatenate(parts) if parts else np.zeros(0, empty.get(key, np.float32))
            for key, parts in self.parts.items()
        }
        share = SplitResult(
            self.ids,
            class_names=self.class_names,
            counts=self.counts,
            correct_examples=self.examples.correct,
            wrong_examples=self.examples.wrong,
            examples_per_class=self.examples.per_class,
            shares=(len(self.ids),),
            **arrays,
        )
        return SplitResult.merge([share])  # sorted by id, like a merged result


def score_share(
    model: torch.nn.Module,
    recipe: Recipe,
    shards: Sequence[ShardEntry],
    class_names: list[str],
    input_size: int,
    *,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    examples_per_class: int = 0,
) -> SplitResult:
    """Scores share `rank` of `world_size` of a split (every sample of it when 1 of 1) on
    `device`, with the recipe's loader workers (`train.loader_workers`), mixed precision
    (`train.amp`) and memory format (`train.channels_last`), as training validates."""
    transform = evaluation_transform(recipe, input_size)
    stream = ShardStream(shards, rank=rank, world_size=world_size, transform=transform, train=False)
    memory_format = memory_format_for(recipe.train.channels_last, device)
    if device.type == "cuda":  # the speed switches training uses on GPUs
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = model.to(device=device, memory_format=memory_format)
    loader = make_loader(
        stream,
        recipe.evaluate.batch_size,
        workers=recipe.train.loader_workers,
        device=device,
        memory_format=memory_format,
    )
    scorer = SplitScorer(
        class_names,
        recipe.evaluate.threshold,
        examples_per_class,
        recipe.augment.mean,
        recipe.augment.std,
    )
    amp_dtype = resolve_amp(recipe.train.amp, device)
    for (images, labels, ids), log_probs in iter_predictions(
        model, loader, flip_tta=recipe.evaluate.flip_tta, amp_dtype=amp_dtype
    ):
        scorer.add(images, labels, list(ids), log_probs)
    return scorer.result()
