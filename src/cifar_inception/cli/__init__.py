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
import time
import warnings
from typing import Any

from cifar_inception import __version__
from cifar_inception.cli.common import terminal_text
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
    started_at = time.time()  # a --budget counts the whole command, torch's import included
    parser = build_parser()
    args = parser.parse_args(argv)
    args.started_at = started_at
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    tolerate_any_encoding()
    with warnings.catch_warnings():
        warnings.showwarning = show_warning_as_one_line
        return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """The command's exit status; the one place where expected failures become one line."""
    try:
        return int(args.func(args) or 0)
    except CifarInceptionError as exc:
        print(f"cifar-inception: error: {terminal_text(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cifar-inception: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except OSError as exc:  # a full disk, a folder that is a file, no permission, ...
        print(f"cifar-inception: error: {terminal_text(describe_os_error(exc))}",
              file=sys.stderr)
        return 1


def tolerate_any_encoding() -> None:
    """Print what the terminal's encoding cannot show (a file name in another script under
    an ASCII locale, one that is not even UTF-8) as backslash escapes, instead of failing."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


def show_warning_as_one_line(message: Warning | str, category: type[Warning], filename: str,
                             lineno: int, file: Any = None, line: str | None = None) -> None:
    """A warning as ``warning: ...`` on stderr (as a run's own warnings read), without the
    source file and line that Python's format adds: they mean nothing to the user."""
    print(f"warning: {terminal_text(message)}", file=file or sys.stderr)
