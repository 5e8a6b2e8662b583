"""`prepare` and `shard`: how the images are validated, split and written as shards."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from attnpipe.config.base import Strict


class SplitRatios(Strict):
    train: float = Field(0.7, gt=0, lt=1)
    val: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.2, ge=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitRatios:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split ratios must sum to 1, got {total:g}")
        return self


class PrepareConfig(Strict):
    splits: SplitRatios = SplitRatios()
    test_split: Literal["stratified", "official"] = Field(
        "stratified",
        description="official: the dataset's own test set (CIFAR, FGVC-Aircraft, ImageNet's "
        "50,000 validation images) is the test split and the rest is split train/val by their "
        "ratio, stratified (splits.test is ignored)",
    )
    seed: int = 0
    folds: int = Field(0, ge=0, description="0 = no k-fold column; else k-fold over train+val")
    max_reject_fraction: float = Field(0.01, ge=0, le=1)
    duplicates: Literal["keep-first", "error"] = "keep-first"
    max_pixels: int = Field(90_000_000, gt=0, description="decompression-bomb guard")
    workers: int = Field(0, ge=0, description="scan processes; 0 = one per core")


class ShardConfig(Strict):
    maxcount: int = Field(1000, gt=0, description="samples per shard at most")
    maxsize: int = Field(256 * 1024 * 1024, gt=0, description="bytes per shard at most")
    min_shards: int = Field(
        4,
        ge=1,
        description="per split, at least this many shards (more: a finer shuffle across epochs; "
        "readers split shards by sample, so any count works for any number of ranks and loader "
        "workers)",
    )
    image_size: int | None = Field(None, gt=0, description="shorter side at shard time")
    format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = Field(
        90, ge=1, le=100, description="90: 30% fewer bytes and 20% faster decoding than 95"
    )
    jpeg_subsampling: Literal["4:2:0", "4:4:4"] = Field(
        "4:2:0", description="chroma resolution: 4:2:0 halves the bytes and the decoding time"
    )
    workers: int = Field(0, ge=0, description="writer processes; 0 = one per core")
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
