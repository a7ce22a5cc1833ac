"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        metavar="PATH",
        default=None,
        help=(
            "where CIFAR-10 is or goes: a folder (holding cifar-10-batches-py/, "
            "cifar-10-python.tar.gz, or train/ and test/ class folders), the official "
            "cifar-10-python.tar.gz itself, or an image-folder tree as .zip/.tar/.tar.gz. "
            "Default: $CIFAR_INCEPTION_DATA, else the user cache folder; downloaded there "
            "on first use"
        ),
    )
    parser.add_argument(
        "--no-download",
        action="store_true",
        help="never download; fail with a message if the data is not already there",
    )


def add_device_arg(parser: argparse.ArgumentParser, what: str) -> None:
    """``--device``, the same flag with the same default for every command."""
    from cifar_inception.options import DEVICE_HELP

    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help=f"torch device {what}: {DEVICE_HELP}")


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value
