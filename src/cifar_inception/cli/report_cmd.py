"""``cifar-inception report RUN``: figures and a self-contained report.html for a run folder."""

from __future__ import annotations

import argparse

from cifar_inception.cli.common import add_command, add_data_args, add_device_arg

DESCRIPTION = """\
Draw a run's training curves, confusion matrix, most confidently misclassified test images
and ten sample images per class, and write them with the test metrics, per-class results
and the run's configuration into one self-contained report.html (images embedded, no
external requests).

The data is the run's own (config.json's data_dir) unless --data-dir is given. The test
metrics come from the run's eval.json when it is for this checkpoint and this test set;
otherwise the test set is evaluated now, without TTA (eval.json is left as it is). Only
RUN/report/ (or --output) is written.
"""


def register(subparsers) -> None:
    parser = add_command(subparsers, "report", run,
                         help="figures and report.html for a run folder",
                         description=DESCRIPTION)
    parser.add_argument("run", metavar="RUN", help="run folder written by train")
    add_data_args(parser)
    parser.add_argument("-o", "--output", metavar="DIR", default=None,
                        help="where to write the figures and report.html (default: RUN/report)")
    parser.add_argument("--misclassified", type=int, default=40, metavar="N",
                        help="how many misclassified test images to show, 1 to 200 (default: 40)")
    add_device_arg(parser, "for predicting the test set")


def run(args: argparse.Namespace) -> int:
    import sys

    from cifar_inception.report import build_report

    report = build_report(args.run, data_dir=args.data_dir, output=args.output,
                          download=not args.no_download, progress=sys.stderr.isatty(),
                          device=args.device, misclassified=args.misclassified)
    for path in report.figures.values():
        print(f"wrote {path}")
    print(f"wrote {report.html}")
    return 0
