"""The ``cifar-inception`` command: one subcommand module each, over the Python API.

Each ``cli/<name>_cmd.py`` defines ``register(subparsers)``, which adds its parser with
:func:`~cifar_inception.cli.common.add_command`, whose ``func`` is a function that parses
nothing further, calls the API and prints. Heavy imports (torch) happen inside those
functions, so ``cifar-inception --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cifar_inception import __version__
from cifar_inception.errors import CifarInceptionError, describe_os_error

# In pipeline order: data, models, training, evaluation, report, use.
COMMANDS = (
    "data",
    "models",
    "summary",
    "train",
    "evaluate",
    "report",
    "predict",
    "export",
    "serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cifar-inception",
        description="Train, evaluate and serve Inception-family networks on CIFAR-10.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"cifar_inception.cli.{name}_cmd").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CifarInceptionError as exc:
        print(f"cifar-inception: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cifar-inception: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except OSError as exc:  # a full disk, a folder that is a file, no permission, ...
        print(f"cifar-inception: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
