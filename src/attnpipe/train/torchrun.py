"""Run the training loop under plain `torchrun`, without Ray.

    torchrun --nproc_per_node 2 -m attnpipe.train.torchrun digits --storage /tmp/run

The training benchmark compares this against Ray Train; it is also handy for debugging the
loop. It writes checkpoints to `--storage` (each whole or not at all, the newest
`train.checkpoints_to_keep` kept) and resumes from them, but writes no `model.pt`.

Across several nodes every rank must see the same checkpoints, or the ranks resume from
different epochs and hang: a multi-node launch refuses a local `--storage` unless
`--shared-storage` says that the path is a shared filesystem (NFS, Lustre, ...) mounted at the
same place on every node.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from attnpipe.config import apply_overrides, load_recipe, parse_assignments
from attnpipe.errors import AttnpipeError
from attnpipe.paths import PipelinePaths
from attnpipe.train.launch import build_loop_config
from attnpipe.train.loop import run_training
from attnpipe.train.repeatability import apply_determinism
from attnpipe.train.session import TorchrunSession


class TorchrunError(AttnpipeError, ValueError):
    pass


def check_storage(storage: Path, shared: bool, environ: dict[str, str] | None = None) -> None:
    """Refuse node-local checkpoints when torchrun spans several nodes."""
    environ = os.environ if environ is None else environ
    world = int(environ.get("WORLD_SIZE", 1))
    local = int(environ.get("LOCAL_WORLD_SIZE", world))
    if world > local and not shared:
        raise TorchrunError(
            f"torchrun spans {world // max(local, 1)} or more nodes ({world} ranks, {local} per "
            f"node) but --storage {storage} is a local path: put it on a filesystem every node "
            "mounts at the same place and add --shared-storage, or train with `attnpipe train "
            "--address` and train.storage_path (s3://...)"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline")
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--storage", type=Path, required=True, help="checkpoint folder")
    parser.add_argument(
        "--shared-storage",
        action="store_true",
        help="--storage is on a filesystem shared by every node (needed across nodes)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe changes, e.g. --set train.epochs=3 (repeatable)",
    )
    args = parser.parse_args(argv)
    check_storage(args.storage, args.shared_storage)
    recipe = load_recipe(args.pipeline, args.root.resolve())
    overrides = parse_assignments(args.set)
    recipe = apply_overrides(recipe, overrides, origin="--set") if overrides else recipe
    config = build_loop_config(recipe, PipelinePaths(args.root.resolve(), args.pipeline))
    config = config.with_changes(best_weights_dir=str(args.storage.resolve() / "best"))
    apply_determinism(recipe.train.deterministic)  # before the session starts CUDA
    session = TorchrunSession(
        args.storage, use_gpu=recipe.train.use_gpu, keep=recipe.train.checkpoints_to_keep
    )
    run_training(config, session)


if __name__ == "__main__":
    main()
