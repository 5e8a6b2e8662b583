"""`prepare` and `shard`: how the images are validated, split and written as shards."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from attnpipe.config.base import Strict


class SplitRatios(Strict):
    """The shares of the images in each split (they sum to 1)."""

    train: float = Field(0.7, gt=0, lt=1, description="share of the images trained on")
    val: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="share validated on each epoch (picks the best epoch and early stopping); "
        "it must not be 0 for training",
    )
    test: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="share held out for `evaluate` (ignored with test_split: official)",
    )

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitRatios:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split ratios must sum to 1, got {total:g}")
        return self


class PrepareConfig(Strict):
    """How the fetched images are validated, de-duplicated and split."""

    splits: SplitRatios = Field(
        SplitRatios(),
        description="train/val/test shares, stratified by class (and group-aware when the "
        "source has groups)",
    )
    test_split: Literal["stratified", "official"] = Field(
        "stratified",
        description="official: the dataset's own test set (CIFAR, FGVC-Aircraft, ImageNet's "
        "50,000 validation images) is the test split and the rest is split train/val by their "
        "ratio, stratified (splits.test is ignored). A folder source with owner splits (split "
        "folders, or source.split_column) keeps them with either value: test and val exactly as "
        "given; a missing val (or, with stratified, a missing test) is carved from train by the "
        "splits' ratios, stratified; official with no test split given is an error",
    )
    seed: int = Field(
        0,
        description="seeds the split, the folds and the training shards' order; another seed "
        "gives another split (and a new data version)",
    )
    folds: int = Field(
        0,
        ge=0,
        description="k: a stratified, group-aware k-fold index over train+val in the manifest's "
        "fold column (-1 for test), for cross-validation; 0 or 1: none",
    )
    max_reject_fraction: float = Field(
        0.01,
        ge=0,
        le=1,
        description="fraction of unusable images (missing, corrupt, too large) above which "
        "prepare fails instead of leaving them out (each is listed in rejected.csv)",
    )
    duplicates: Literal["keep-first", "error"] = Field(
        "keep-first",
        description="byte-identical images: keep-first keeps the first by id and lists the "
        "others as rejected; error fails, naming them",
    )
    max_pixels: int = Field(
        90_000_000,
        gt=0,
        description="images with more pixels (width x height) are rejected: a guard against "
        "decompression bombs; raise it for very large scans",
    )
    workers: int = Field(
        0, ge=0, description="processes that decode and check the images; 0: one per core"
    )


class ShardConfig(Strict):
    """How each split is written as WebDataset tar shards, the input of training."""

    maxcount: int = Field(
        1000, gt=0, description="samples per shard at most (more shards when a split has more)"
    )
    maxsize: int = Field(
        256 * 1024 * 1024,
        gt=0,
        description="bytes per shard at most, estimated from the source files (default 256 MiB)",
    )
    min_shards: int = Field(
        4,
        ge=1,
        description="per split, at least this many shards (more: a finer shuffle across epochs; "
        "readers split shards by sample, so any count works for any number of ranks and loader "
        "workers)",
    )
    image_size: int | None = Field(
        None,
        gt=0,
        description="resize so that the shorter side is this many pixels (never enlarged) "
        "before encoding: smaller shards, faster reading; set it at or a little above "
        "model.input_size for large images; null: stored as they are",
    )
    format: Literal["jpg", "png"] = Field(
        "jpg", description="how images are encoded: jpg (lossy, small) or png (lossless)"
    )
    jpeg_quality: int = Field(
        90,
        ge=1,
        le=100,
        description="jpg: the encoder's quality; 90 gives 30% fewer bytes and 20% faster "
        "decoding than 95",
    )
    jpeg_subsampling: Literal["4:2:0", "4:4:4"] = Field(
        "4:2:0", description="chroma resolution: 4:2:0 halves the bytes and the decoding time"
    )
    workers: int = Field(
        0, ge=0, description="processes that write shards; 0: one per core (ignored with Ray)"
    )
    publish_to: str | None = Field(
        None,
        description="also upload the shards here (s3://bucket/prefix, gs://..., or an absolute "
        "path on shared storage); train and evaluate then read them from here on every node",
    )

    @model_validator(mode="after")
    def _shared_location(self) -> ShardConfig:
        target = self.publish_to
        if target is not None and "://" not in target and not target.startswith("/"):
            raise ValueError(
                f"publish_to must be a URL (s3://bucket/prefix) or an absolute path that every "
                f"node sees, got {target!r}"
            )
        return self
