"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

# C0 and C1 control characters but newline and tab, and the bidirectional overrides: what a
# file's text (a class name, a file name) could use to move the cursor, recolour or rewrite
# the terminal, or to show text in another order than it is.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROL_OR_BREAK = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def add_command(subparsers: argparse._SubParsersAction, name: str,
                run: Callable[[argparse.Namespace], int], *, help: str,
                description: str) -> argparse.ArgumentParser:
    """The parser of one subcommand, with ``run`` as its ``func``. A description laid out by
    hand (paragraphs, a table) is printed as written; one without line breaks is one
    paragraph, wrapped to the terminal."""
    layout = argparse.RawDescriptionHelpFormatter if "\n" in description \
        else argparse.HelpFormatter
    parser = subparsers.add_parser(name, help=help, description=description,
                                   formatter_class=layout)
    parser.set_defaults(func=run)
    return parser


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        metavar="PATH",
        default=None,
        help=(
            "where the data is or goes: a folder (holding cifar-10-batches-py/, "
            "cifar-10-python.tar.gz, cifar-100-python/, or train/ and test/ class folders), "
            "an official archive itself, or an image-folder tree as .zip/.tar/.tar.gz (any "
            "class folders: they are the classes). "
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


def terminal_text(text: object) -> str:
    """``text`` for the terminal: control characters shown as escapes (``\\x1b``)."""
    return _CONTROL.sub(_escaped, str(text))


def terminal_line(text: object) -> str:
    """One value (a file or class name) for one line of the terminal: as
    :func:`terminal_text`, and a newline or tab in it shown as ``\\n``, ``\\t``, so that a
    crafted file name cannot add a line that looks like another result."""
    return _CONTROL_OR_BREAK.sub(_escaped, str(text))


def _escaped(found: re.Match) -> str:
    return found.group().encode("unicode_escape").decode("ascii")


WEIGHTS_HELP = ("trained weights instead of a run: a shipped name (see `cifar-inception "
                "models`), 'default', a .pt path, or a URL ending in #sha256=HEX (downloaded "
                "once into the cache, its hash checked)")


def add_weights_arg(parser: argparse.ArgumentParser) -> None:
    """``--weights``, the same flag with the same meaning for every command that loads a model."""
    parser.add_argument("--weights", metavar="NAME|PATH|URL", default=None, help=WEIGHTS_HELP)
