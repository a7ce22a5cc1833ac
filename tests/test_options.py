"""Options defined once (options.py): every TrainConfig option is a `train` flag, its value
reaches the configuration, and its declared checks refuse what cannot work."""

from __future__ import annotations

import dataclasses
import functools

import pytest

from cifar_inception.cli import build_parser
from cifar_inception.cli.train_cmd import collect_overrides
from cifar_inception.options import ConfigError, _kind, check_fields, flag_of, parse_duration
from cifar_inception.recipes import TrainConfig

# Set another way: the positional MODEL, --recipe, --option/--width, --data-dir, --no-download.
NOT_FLAGS = {"model", "model_options", "recipe", "data_dir", "download"}


@functools.cache
def _train_parser():
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    return subparsers.choices["train"]


def _an_example(field: dataclasses.Field) -> tuple[list[str], object]:
    """Command-line words for ``field`` and the value they must give."""
    base, _ = _kind(TrainConfig, field.name)
    flag, choices = flag_of(field), field.metadata.get("choices")
    if base is bool:
        return [flag], True
    if choices:
        return [flag, str(choices[-1])], choices[-1]
    if field.metadata.get("parse") is parse_duration:
        return [flag, "90s"], 90.0
    if field.metadata.get("nargs"):
        return [flag, "0.5"], 0.5
    if base is int:
        return [flag, "3"], 3
    if base is float:
        return [flag, "0.25"], 0.25
    return [flag, "example"], "example"


def test_every_option_but_the_positional_ones_has_a_flag():
    flags = {option for action in _train_parser()._actions for option in action.option_strings}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    missing = [f.name for f in dataclasses.fields(TrainConfig)
               if f.name not in NOT_FLAGS and flag_of(f) not in flags]
    assert missing == []
    assert NOT_FLAGS <= fields  # a renamed field would make this list lie


@pytest.mark.parametrize("field", [f for f in dataclasses.fields(TrainConfig)
                                   if f.name not in NOT_FLAGS], ids=lambda f: f.name)
def test_each_flag_reaches_its_option(field):
    words, value = _an_example(field)
    args = _train_parser().parse_args(words)
    assert collect_overrides(args) == {field.name: value}


def test_an_option_not_given_is_not_overridden():
    assert collect_overrides(_train_parser().parse_args([])) == {}


def test_declared_bounds_and_choices_are_checked():
    with pytest.raises(ConfigError, match="label smoothing"):
        check_fields(dataclasses.replace(TrainConfig(), label_smoothing=1.5))
    with pytest.raises(ConfigError, match="padding mode must be one of"):
        check_fields(dataclasses.replace(TrainConfig(), padding_mode="mirror"))
    check_fields(TrainConfig())  # the defaults pass
