"""``cifar-inception evaluate RUN_OR_CHECKPOINT``: test-set metrics as a table (or JSON)."""

from __future__ import annotations

import argparse
import sys

from cifar_inception.cli.common import (
    add_command,
    add_data_args,
    add_device_arg,
    add_weights_arg,
    terminal_text,
)

DESCRIPTION = """\
Evaluate a trained model on the CIFAR-10 test set: loss (cross-entropy), top-1 and top-5
accuracy, accuracy per class and the confusion matrix. RUN_OR_CHECKPOINT is a run folder
(its best.pt is used) or a .pt checkpoint. The results are written to eval.json beside the
checkpoint (to eval-NAME.json when eval.json holds another checkpoint's, as a run's test of
its best.pt). The data set is the one the run was trained on unless --data-dir says otherwise.
--weights NAME evaluates shipped (or downloaded) weights instead, and writes no eval.json.

--tta averages the softmax probabilities of six views of each image: the image and its
mirror, each as is and shifted by 2 pixels up-left and down-right (reflect padding);
--tta-views 2 keeps only the image and its mirror (most of the gain for a third of the cost).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "evaluate", run,
        help="test-set accuracy, loss, per-class accuracy, confusion matrix",
        description=DESCRIPTION)
    parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", nargs="?", default=None,
                        help="run folder or .pt checkpoint")
    add_weights_arg(parser)
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: flips and small translations")
    parser.add_argument("--tta-views", type=int, choices=(2, 6), default=6, metavar="{2,6}",
                        help="views of each image with --tta (default 6)")
    add_device_arg(parser, "for evaluating")
    parser.add_argument("--batch-size", type=int, default=1000, metavar="N")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.add_argument("--no-write", action="store_true", help="do not write eval.json")
    add_data_args(parser)


# Up to this many classes the whole confusion matrix is printed; beyond, the pairs most
# confused (a 100x100 matrix is unreadable in a terminal).
MAX_MATRIX_CLASSES = 20


def format_table(result: dict) -> str:
    """Headline metrics, per-class accuracy, and the confusion matrix (or, for many classes,
    the pairs most confused), as plain text."""
    classes = list(result["per_class"])
    views = f", {result.get('views', 6)} test-time views" if result["tta"] else ""
    lines = [
        f"checkpoint  {result['checkpoint']}",
        f"images      {result['num_images']} (test set){views}",
        f"loss        {result['test_loss']:.4f} (cross-entropy)",
        f"top-1       {100 * result['test_top1']:6.2f}%",
        *([f"top-5       {100 * result['test_top5']:6.2f}%"] if "test_top5" in result else []),
        "",
        f"{'class':<12}{'accuracy':>9}",
    ]
    for name, accuracy in result["per_class"].items():
        shown = "-" if accuracy is None else f"{100 * accuracy:.2f}%"
        lines.append(f"{name:<12}{shown:>9}")
    if len(classes) > MAX_MATRIX_CLASSES:
        return "\n".join(lines + _most_confused_lines(result["confusion"], classes))
    width = max(5, *(len(str(v)) for row in result["confusion"] for v in row)) + 1
    lines += ["", "confusion matrix (rows: true class, columns: predicted)",
              " " * 12 + "".join(f"{name[:width - 1]:>{width}}" for name in classes)]
    for name, row in zip(classes, result["confusion"]):
        lines.append(f"{name:<12}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def _most_confused_lines(confusion: list[list[int]], classes: list[str]) -> list[str]:
    from cifar_inception.evaluation import most_confused

    lines = ["", f"most confused pairs ({len(classes)} classes; the full matrix is in the "
                 "JSON output)", f"{'true class':<20}{'predicted':<20}{'images':>7}"]
    lines += [f"{true:<20}{predicted:<20}{n:>7}"
              for true, predicted, n in most_confused(confusion, classes)]
    return lines


def run(args: argparse.Namespace) -> int:
    from cifar_inception.evaluation import evaluate
    from cifar_inception.fileio import to_json
    from cifar_inception.pretrained import model_source
    from cifar_inception.runs import RunFolder

    source = model_source(args.checkpoint, args.weights)
    write = source.is_run and not args.no_write  # never into the package or the cache
    if not source.is_run:
        print(f"using {source.describe()}", file=sys.stderr if args.json else sys.stdout)
    result = evaluate(source.path, tta=args.tta, tta_views=args.tta_views,
                      device=args.device,
                      batch_size=args.batch_size, data_dir=args.data_dir,
                      download=not args.no_download, write=write)
    print(to_json(result, indent=2) if args.json else terminal_text(format_table(result)))
    if write:
        # On stderr with --json, so that stdout stays one JSON document.
        written = RunFolder.holding(result["checkpoint"]).eval_file_for(result["checkpoint"])
        print(f"wrote {written}", file=sys.stderr if args.json else sys.stdout)
    return 0
