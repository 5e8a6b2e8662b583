"""Run the training loop under plain `torchrun`, without Ray.

    torchrun --nproc_per_node 2 -m attnpipe.train.torchrun digits --storage /tmp/run

The training benchmark compares this against Ray Train; it is also handy for debugging the
loop. It writes checkpoints to `--storage` (and resumes from them) but not `model.pt`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from attnpipe.config import apply_overrides, load_recipe
from attnpipe.paths import PipelinePaths
from attnpipe.train.launch import build_loop_config
from attnpipe.train.loop import run_training
from attnpipe.train.session import TorchrunSession


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline")
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--storage", type=Path, required=True, help="checkpoint folder")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=YAML",
        help="recipe overrides, e.g. train.epochs=3",
    )
    args = parser.parse_args(argv)
    import yaml

    recipe = load_recipe(args.pipeline, args.root.resolve())
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    recipe = apply_overrides(recipe, overrides, origin="--set") if overrides else recipe
    config = build_loop_config(recipe, PipelinePaths(args.root.resolve(), args.pipeline))
    run_training(config, TorchrunSession(args.storage))


if __name__ == "__main__":
    main()
