"""The command dispatcher: every subcommand is there, and user errors are one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cifar_inception import __version__
from cifar_inception.cli import COMMANDS, build_parser, main


def test_every_subcommand_is_registered(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"    {name} " in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: cifar-inception" in capsys.readouterr().out


def test_user_error_is_one_line_with_status_2(capsys):
    assert main(["summary", "inception-v9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cifar-inception: error: unknown model 'inception-v9'")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "cifar_inception", "--version"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert done.stdout.strip() == f"cifar-inception {__version__}"


def test_a_warning_is_one_clean_line(monkeypatch, capsys):
    import warnings

    import cifar_inception.cli.summary_cmd as summary_cmd

    def warns(args):
        warnings.warn("could not cache the decoded arrays in /cache: Permission denied")
        return 0

    monkeypatch.setattr(summary_cmd, "run", warns)
    assert main(["summary", "googlenet"]) == 0
    assert capsys.readouterr().err == ("warning: could not cache the decoded arrays in "
                                       "/cache: Permission denied\n")


def test_an_error_cannot_drive_the_terminal(monkeypatch, capsys):
    import cifar_inception.cli.summary_cmd as summary_cmd
    from cifar_inception.errors import CheckpointError

    def fails(args):  # as a message quoting a checkpoint's class names would
        raise CheckpointError("trained on classes cat\x1b[2J, dog\x1b]0;x\x07")

    monkeypatch.setattr(summary_cmd, "run", fails)
    assert main(["summary", "googlenet"]) == 2
    err = capsys.readouterr().err
    assert err == "cifar-inception: error: trained on classes cat\\x1b[2J, dog\\x1b]0;x\\x07\n"
