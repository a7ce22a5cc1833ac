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
            "one 32x32 image (--image-size N: N x N), parameters, and the layers it reads "
            "from; then the totals and the multiply-adds per image. "
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
    parser.add_argument("--image-size", type=int, default=32, metavar="N",
                        help="the side of the input images, as train --image-size "
                             "(default: 32); the model must take it")


def run(args: argparse.Namespace) -> int:
    from cifar_inception.data.specs import check_image_size as check_data_size
    from cifar_inception.models.registry import check_image_size, parse_options
    from cifar_inception.summary import build_on_meta, count_macs, format_summary

    options = parse_options(args.options)
    model = build_on_meta(args.name, num_classes=args.num_classes, **options)
    side = check_data_size(args.image_size)  # the sizes a run can train at
    check_image_size(args.name, side)
    print(format_summary(model, (1, 3, side, side), name=args.name))
    print(f"Multiply-adds per {side}x{side} image (inference): "
          f"{count_macs(model, side):,}")
    return 0
