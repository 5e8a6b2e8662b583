"""`attnpipe`: a thin command line over the library; each subcommand runs one stage.

One module per command group: `stages` (the pipeline's stages, tune, run), `cluster` (submit,
jobs), `predict`, `project` (init, config, models); `options` holds what they share.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from attnpipe.cli.cluster import add_cluster_commands
from attnpipe.cli.predict import add_predict
from attnpipe.cli.project import add_project_commands
from attnpipe.cli.stages import add_run, add_stage_commands, add_tune
from attnpipe.errors import AttnpipeError

DESCRIPTION = """\
Reproducible training of attention CNNs: fetch -> prepare -> shard -> train -> evaluate,
export (ONNX); then `predict` on new images.

Each stage reads pipelines/<name>.yaml (the recipe) and the previous stage's outputs under
data/<name>/, models/<name>/ and reports/<name>/. `dvc repro` runs them all for the pipelines
listed in params.yaml; every stage also runs on its own. `attnpipe run <name>` chains them
without DVC.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # `kill`, a scheduler or a preempted node sends SIGTERM: unwind like Ctrl-C, so that Ray
    # shuts down cleanly and every checkpoint written so far survives for the next run.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        print(
            "attnpipe: interrupted; finished epochs are checkpointed: run the same command "
            "again to resume",
            file=sys.stderr,
        )
        return 130
    except Exception as error:
        if args.debug or not is_expected(error):
            raise
        # One line, whatever the message holds: the traceback is one --debug away.
        print(f"attnpipe: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def is_expected(error: BaseException) -> bool:
    """A failure of the user's input or environment (printed as one line), not a bug."""
    from attnpipe.models import ModelError

    return isinstance(error, AttnpipeError | ModelError | FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnpipe",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("."),
        help="project folder holding pipelines/ (default: .)",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    add_stage_commands(commands)
    add_tune(commands)
    add_predict(commands)
    add_run(commands)
    add_cluster_commands(commands)
    add_project_commands(commands)
    return parser
