"""`attnpipe predict`: classify image files with model.pt or model.onnx."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PREDICT_DESCRIPTION = """\
Predict the class of image files with a trained model: models/<name>/model.pt, or the
models/<name>/model.onnx that `attnpipe export` writes (run by ONNX Runtime; no PyTorch model
code needed). Images are read like the training data (EXIF orientation, any mode to RGB) and
resized, centre-cropped and normalised like evaluation; flip TTA is used when the model's
recipe had evaluate.flip_tta on.

Inputs: image files and/or folders (a folder's files, not recursive, sorted by name).

Output: one line per file, the predicted class and its probability, as a table on stdout,
or as CSV with --output FILE.csv (columns file, class_index, class, probability, error).
A file that is missing, corrupt or not an image gets an error line (on stderr, and in the
error column) and every other file is still predicted.

--kaggle-submission writes a Kaggle submission instead (default file: submission.csv):
header image_id,label, the file name as image_id and the predicted class index as label
(for Cassava, the competition's numeric label). With --sample-submission, its header and its
ids in its order are copied exactly; an id without a usable image keeps the sample's label
and counts as a failure.

Exit status: 0 when every file was predicted, 1 when any failed (or an error stopped the
command), 2 for wrong arguments.
"""


def add_predict(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser(
        "predict",
        help="predict image files or folders with model.pt or model.onnx",
        description=PREDICT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("inputs", nargs="+", type=Path, help="image files and/or folders")
    sub.add_argument(
        "-m",
        "--model",
        type=Path,
        required=True,
        help="models/<name>/model.pt, or an .onnx file written by `attnpipe export`",
    )
    sub.add_argument(
        "-o",
        "--output",
        type=Path,
        help="write CSV here instead of printing a table (with --kaggle-submission: the "
        "submission file, default submission.csv)",
    )
    sub.add_argument(
        "--kaggle-submission",
        action="store_true",
        help="write a Kaggle submission (image_id,label) instead of the prediction table",
    )
    sub.add_argument(
        "--sample-submission",
        type=Path,
        help="the competition's sample_submission.csv: copy its header and id order exactly",
    )
    sub.add_argument(
        "--batch-size", type=int, default=32, help="images per forward pass (default: 32)"
    )
    sub.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    from attnpipe.evaluate.predict import (
        PredictError,
        collect_files,
        format_table,
        load_predictor,
        predict_files,
        write_predictions_csv,
        write_submission,
    )

    if args.sample_submission and not args.kaggle_submission:
        raise PredictError("--sample-submission needs --kaggle-submission")
    predictor = load_predictor(args.model)
    files = collect_files(args.inputs)
    if not files:
        print("attnpipe: error: no files found in the inputs", file=sys.stderr)
        return 1
    rows = predict_files(predictor, files, batch_size=args.batch_size)
    failed = [f"{r.path.name} ({r.error})" for r in rows if not r.ok]
    if args.kaggle_submission:
        target = args.output or Path("submission.csv")
        submission = write_submission(rows, target, args.sample_submission)
        print(f"submission: {submission.rows} rows written to {target}")
        for problem in submission.problems:
            print(f"  kept the sample's label: {problem}")
        failed = [problem.replace(": ", " (", 1) + ")" for problem in submission.problems]
    elif args.output:
        write_predictions_csv(rows, args.output)
        print(f"predictions: {len(rows) - len(failed)} of {len(rows)} files -> {args.output}")
    else:
        print(format_table(rows))  # failed files are ERROR rows, with the reason
    if failed:
        # One line whatever the count: the table, the CSV's error column or the lines above
        # hold every file's reason.
        shown = ", ".join(failed[:3]) + (f", and {len(failed) - 3} more" if len(failed) > 3 else "")
        count = f"{len(failed)} of {len(rows)} file(s)"
        print(f"attnpipe: error: {count} could not be predicted: {shown}", file=sys.stderr)
        return 1
    return 0
