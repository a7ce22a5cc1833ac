"""``cifar-inception summary NAME``: the Keras-style layer table of one model."""

from __future__ import annotations

import argparse

from cifar_inception.cli.common import add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "summary", run,
        help="print a model's layer table (Keras style) with its parameter totals",
        description=(
            "Print the layer table of a registered model: layer (type), output shape for "
            "one 32x32 image, parameters, and the layers it reads from; then the totals. "
            "The model is built on the meta device (shapes only), so even the largest "
            "takes no memory."
        ),
    )
    parser.add_argument("name", metavar="NAME", help="model name (see: cifar-inception models)")
    parser.add_argument(
        "--option", "-o", dest="options", metavar="KEY=VALUE", action="append", default=[],
        help="a model option, e.g. --option fix_3x3=true or --option width=0.5 (repeatable)",
    )
    parser.add_argument("--num-classes", type=int, default=10, metavar="N",
                        help="number of output classes (default: 10)")


def run(args: argparse.Namespace) -> int:
    from cifar_inception.models.registry import parse_options
    from cifar_inception.summary import build_on_meta, format_summary

    options = parse_options(args.options)
    model = build_on_meta(args.name, num_classes=args.num_classes, **options)
    print(format_summary(model, name=args.name))
    return 0
