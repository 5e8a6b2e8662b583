"""The data stages run without torch, and their shards are WebDataset's bytes.

fetch, prepare and shard check the recipe's model section (names and arguments from the
catalogue, read from the factories' source) and write tars with the standard library: a
process that imported torch and torchvision for either spent about 7 s of CPU on it (every
stage process and every shard worker, on a 2-core machine).
"""

from __future__ import annotations

import inspect
import io
import shutil
import subprocess
import sys

import pytest
import webdataset as wds

from attnpipe.data.tar_writer import ShardTarWriter
from attnpipe.models import catalog, list_models, model_kwargs, registry

# One interpreter for the three stages: what one imports, the next finds imported. A shard
# worker imports the modules this process imported to write shards.
STAGES_WITHOUT_TORCH = """
import sys
from attnpipe.cli import main
for stage in ("fetch", "prepare", "shard"):
    assert main(["--root", sys.argv[1], stage, "digits", "--no-progress"]) == 0, stage
    print(stage, "imported torch:", "torch" in sys.modules)
"""


def test_the_catalogue_reads_each_factorys_own_signature():
    for name in list_models():
        model = catalog.entry(name)
        factory = registry._factory(model)
        params = inspect.signature(factory).parameters
        expected = {k: p.default for k, p in params.items() if k != "num_classes"}
        assert model_kwargs(name) == expected, name
        assert factory.__module__ == f"attnpipe.models.{model.module}"
        weights = registry._imagenet_weights(model)
        # The catalogue's backbone names torchvision's file: resnet50-..., vgg16_bn-...
        assert (weights is None) == (model.backbone is None), name
        if weights is not None:
            assert weights.url.rsplit("/", 1)[-1].startswith(f"{model.backbone}-"), name
            assert callable(getattr(factory(num_classes=3), "load_backbone", None)), name


def test_fetch_prepare_and_shard_never_import_torch(digits_project, tmp_path):
    _, built = digits_project
    root = tmp_path / "project"
    shutil.copytree(built.root, root)
    shutil.rmtree(root / "data" / "digits" / "shards")
    done = subprocess.run(
        [sys.executable, "-c", STAGES_WITHOUT_TORCH, str(root)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for stage in ("fetch", "prepare", "shard"):
        assert f"{stage} imported torch: False" in done.stdout, done.stdout[-500:]
    rebuilt = sorted((root / "data/digits/shards").rglob("*.tar"))
    assert rebuilt and all(
        path.read_bytes() == (built.root / path.relative_to(root)).read_bytes() for path in rebuilt
    )


def _samples() -> list[tuple[str, dict[str, bytes]]]:
    """Short and long keys (over tar's 100-byte name field: PAX headers), non-ASCII ones,
    members of several sizes, including empty and block-sized ones."""
    return [
        ("sample_00000", {"png": b"\x89PNG" * 100, "cls": b"3", "json": b'{"id": 0}'}),
        ("k" * 140, {"jpg": bytes(range(256)) * 2, "cls": b"", "json": b"{}"}),
        ("ünïcode/ключ", {"webp": b"x" * 512, "cls": b"12"}),
    ]


@pytest.mark.parametrize("samples", [_samples(), []], ids=["samples", "empty"])
def test_the_writer_writes_webdatasets_bytes_and_offsets(samples):
    ours, theirs = io.BytesIO(), io.BytesIO()
    our_offsets, their_offsets = [], []
    with ShardTarWriter(ours) as writer, wds.TarWriter(theirs, mtime=0) as reference:
        for key, members in samples:
            our_offsets.append(writer.offset)
            their_offsets.append(reference.tarstream.offset)
            writer.write(key, members)
            reference.write({"__key__": key, **members})
        our_offsets.append(writer.offset)
        their_offsets.append(reference.tarstream.offset)
    assert ours.getvalue() == theirs.getvalue()
    assert our_offsets == their_offsets
    assert len(ours.getvalue()) % 512 == 0
