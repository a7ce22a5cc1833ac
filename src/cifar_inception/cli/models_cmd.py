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
            "inference), what it is for, the options it accepts (--option key=value "
            "in train and summary) and the image sizes it takes (--image-size N in "
            "train), then the trained weights the package ships (--weights "
            "NAME in predict, evaluate, export, serve and train), with their test accuracy."
        ),
    )


def run(args: argparse.Namespace) -> int:
    from cifar_inception.models.registry import model_info, model_options
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
    print()
    print("Image sizes (--image-size N in train; 8 to 512 pixels, the data's bounds):")
    for row in table:
        print(f"  {row['name']:<{widths[0]}}  {model_info(row['name']).sizes.describe()}")
    print()
    print_weights()
    return 0


def print_weights() -> None:
    """The shipped weights: name, what they fit, test top-1 without and with TTA, how made."""
    from cifar_inception.pretrained import get_weights, list_weights

    names = list_weights()
    if not names:
        print("Trained weights: none shipped with this install")
        return
    print("Trained weights (--weights NAME; * the default of predict and serve):")
    rows = [("name", "model", "options", "test top-1", "with TTA", "epochs", "data")]
    for name in names:
        w = get_weights(name)
        rows.append((
            name + (" *" if w.default else ""), w.model,
            ", ".join(f"{k}={v}" for k, v in w.options.items()) or "-",
            _percent(w.test_acc), _percent(w.test_acc_tta),
            str(w.record.get("epochs", "?")), str(w.record.get("data", "?"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths)).rstrip())


def _percent(value: float | None) -> str:
    return "?" if value is None else f"{100 * value:.2f}%"
