"""Options defined once: a dataclass field that carries its help, choices, bounds and flag.

A training option is declared with :func:`option` in :class:`~cifar_inception.recipes.TrainConfig`;
from that one declaration come

- its command-line flag (:func:`add_flags`, used by ``cifar-inception train``),
- the collection of the flags given (:func:`given_options`),
- the check of its value (:func:`check_fields`: type, finiteness, bounds, choices),
- whether a resumed run may change it (``runtime``).

So adding an option is one edit. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any

from cifar_inception.errors import CifarInceptionError

GROUPS = {
    "model": "model",
    "data": "data",
    "optimisation": "optimisation",
    "augmentation": "augmentation (on the device, in batches)",
    "run": "run",
}
DEVICE_HELP = "auto (the GPU when there is one, the default), cpu, cuda or cuda:N"
MAX_INT = 2 ** 63 - 1  # what a seed or a count may be: torch's generators take 64 bits


class ConfigError(CifarInceptionError):
    """An unknown recipe, an unknown option or a value out of range."""


def option(default: Any = None, help: str = "", *, group: str = "run", label: str | None = None,
           flag: str | None = None, choices: tuple[str, ...] | None = None,
           minimum: float | None = None, maximum: float | None = None,
           above: float | None = None, below: float | None = None,
           check: Callable[[Any], str | None] | None = None, parse: Callable[[str], Any] | None = None,
           nargs: str | None = None, metavar: str | None = None, runtime: bool = False,
           cli: bool = True, factory: Callable[[], Any] | None = None) -> Any:
    """A :class:`TrainConfig` field with everything the CLI and the checks need.

    ``minimum``/``maximum`` are inclusive bounds, ``above``/``below`` exclusive ones;
    ``check(value)`` returns an error message for what the bounds cannot say. ``flag`` is the
    command-line name without dashes (default: the field's name with dashes); ``cli=False``
    for the few fields set another way (the positional model, ``--data-dir``).
    ``runtime``: the option says how to run, not what is computed, so a resume may change it.
    """
    metadata = dict(help=help, group=group, label=label, flag=flag, choices=choices,
                    minimum=minimum, maximum=maximum, above=above, below=below, check=check,
                    parse=parse, nargs=nargs, metavar=metavar, runtime=runtime, cli=cli)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# --- what a field's annotation says


def _kind(cls: type, name: str) -> tuple[type, bool]:
    """(base type, accepts None) of a field, from its annotation."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or \
        typing.get_origin(hint) is typing.Union else (hint,)
    non_none = [a for a in args if a is not type(None)]
    base = typing.get_origin(non_none[0]) or non_none[0]
    return base, len(non_none) < len(args)


def label_of(f: dataclasses.Field) -> str:
    return f.metadata.get("label") or f.name.replace("_", " ")


def flag_of(f: dataclasses.Field) -> str:
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


# --- checks


def _bounds_text(m: dict) -> str:
    low = m["minimum"] if m["minimum"] is not None else m["above"]
    high = m["maximum"] if m["maximum"] is not None else m["below"]
    if low is not None and high is not None:
        return (f"in {'[' if m['minimum'] is not None else '('}{low}, "
                f"{high}{']' if m['maximum'] is not None else ')'}")
    if low is not None:
        return f"{'>=' if m['minimum'] is not None else '>'} {low}"
    return f"{'<=' if m['maximum'] is not None else '<'} {high}"


def is_number(value: Any) -> bool:
    """An int or float, not a bool (NaN passes here and fails every comparison after)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _within(value: float, m: dict) -> bool:
    return ((m["minimum"] is None or value >= m["minimum"])
            and (m["maximum"] is None or value <= m["maximum"])
            and (m["above"] is None or value > m["above"])
            and (m["below"] is None or value < m["below"]))


def field_problem(cls: type, f: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with ``value`` for field ``f`` (None: nothing)."""
    m, label = f.metadata, label_of(f)
    base, optional = _kind(cls, f.name)
    if value is None:
        return None if optional else f"{label} must be given"
    if m.get("check") is not None:
        return m["check"](value)
    if base is bool:
        return None if isinstance(value, bool) else f"{label} must be true or false, not {value!r}"
    if base in (int, float):
        whole = isinstance(value, int) and not isinstance(value, bool)
        if base is int and not whole:
            return f"{label} must be a whole number, not {value!r}"
        if base is float and not (whole or isinstance(value, float)):
            return f"{label} must be a number, not {value!r}"
        if not math.isfinite(value) or abs(value) > MAX_INT:
            return f"{label} must be a finite number up to {MAX_INT}, not {value!r}"
        has_bounds = any(m.get(k) is not None for k in ("minimum", "maximum", "above", "below"))
        if has_bounds and not _within(value, m):
            return f"{label} must be {_bounds_text(m)}, not {value}"
        return None
    if m.get("choices") is not None and value not in m["choices"]:
        return f"{label} must be one of {', '.join(m['choices'])}, not {value!r}"
    if base is str and not isinstance(value, str):
        return f"{label} must be text, not {value!r}"
    if base is dict and not isinstance(value, dict):
        return f"{label} must be a mapping"
    return None


def check_fields(config: Any) -> None:
    """Raise :class:`ConfigError` for the first field whose value cannot work."""
    for f in dataclasses.fields(config):
        problem = field_problem(type(config), f, getattr(config, f.name))
        if problem:
            raise ConfigError(problem)


def runtime_fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("runtime"))


# --- the command line


# One number and its unit, matched from a given position: no nesting and nothing optional
# before a required part, so a match is linear in the text (a nested pattern once made
# "1111...1sec" take time doubling with each digit).
_DURATION_PART = re.compile(r"\s*(\d+\.?\d*|\.\d+)\s*([hms]?)\s*")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}
MAX_DURATION_TEXT = 64  # characters: longer is no duration anyone means


def parse_duration(text: str) -> float:
    """``"600"``, ``"90s"``, ``"10m"``, ``"1h"``, ``"1h30m"`` -> seconds (finite)."""
    lowered, position, total = text.lower(), 0, 0.0
    while len(text) <= MAX_DURATION_TEXT and position < len(lowered):
        part = _DURATION_PART.match(lowered, position)
        if part is None or part.end() == position:
            break
        if not part.group(2) and part.end() < len(lowered):
            break  # a number without its unit ends the text: "1..2" is no duration
        total += float(part.group(1)) * _UNIT_SECONDS[part.group(2)]
        position = part.end()
    if not lowered.strip() or position < len(lowered) or not math.isfinite(total):
        raise argparse.ArgumentTypeError(
            f"not a duration: {text[:MAX_DURATION_TEXT]!r} (examples: 600, 90s, 10m, 1h, "
            f"1h30m)")
    return total


def _argparse_type(base: type, parse: Callable[[str], Any] | None) -> Callable[[str], Any]:
    if parse is not None:
        return parse
    return {int: int, float: float}.get(base, str)


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of ``cls`` (those with ``cli``), in their groups; default None."""
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for f in dataclasses.fields(cls):
        m = f.metadata
        if not m.get("cli", True):
            continue
        base, _ = _kind(cls, f.name)
        target = groups[m.get("group", "run")]
        common = dict(dest=f.name, default=None, help=m.get("help") or None)
        if base is bool:
            target.add_argument(flag_of(f), action=argparse.BooleanOptionalAction, **common)
            continue
        extra: dict[str, Any] = {}
        if m.get("choices"):
            extra["choices"] = m["choices"]
        else:
            extra["metavar"] = m.get("metavar") or f.name.split("_")[-1].upper()
        if m.get("nargs"):
            extra["nargs"] = m["nargs"]
        target.add_argument(flag_of(f), type=_argparse_type(base, m.get("parse")), **common,
                            **extra)


def given_options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options given on the command line, and only those (None means 'not given')."""
    given = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True) and getattr(args, f.name, None) is not None:
            value = getattr(args, f.name)
            if f.metadata.get("nargs") and len(value) == 1:
                value = value[0]  # one value stands for all (for example --aux-weights 0.3)
            given[f.name] = value
    return given
