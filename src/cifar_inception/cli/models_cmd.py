"""``cifar-inception models``: every registered model with its size, cost and purpose."""

from __future__ import annotations

import argparse

from cifar_inception.cli.common import add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(
        subparsers, "models", run,
        help="list the models: parameters, multiply-adds per image, purpose",
        description=(
            "List every registered model with its parameter count (auxiliary heads "
            "included), its multiply-adds per 32x32 image (convolutions and linear layers, "
            "inference), what it is for, and the options it accepts (--option key=value "
            "in train and summary)."
        ),
    )


def run(args: argparse.Namespace) -> int:
    from cifar_inception.models.registry import model_options
    from cifar_inception.summary import model_table

    table = model_table()
    header = ("model", "params", "multiply-adds/image", "purpose")
    cells = [(row["name"], f"{row['params']:,}", f"{row['macs']:,}", row["purpose"])
             for row in table]
    widths = [max(len(header[i]), *(len(c[i]) for c in cells)) for i in range(3)]
    for name, params, macs, purpose in [header, *cells]:
        print(f"{name:<{widths[0]}}  {params:>{widths[1]}}  {macs:>{widths[2]}}  {purpose}")
    print()
    print("Options (--option key=value), with defaults:")
    for row in table:
        options = ", ".join(f"{key}={value}" for key, value in model_options(row["name"]).items())
        print(f"  {row['name']:<{widths[0]}}  {options or '(none)'}")
    return 0
