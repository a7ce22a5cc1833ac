"""A training run stopped, broken or doubled at any moment: one line, the right exit code,
and the same command (or --resume) always continues or starts the run again."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest

import cifar_inception.fileio as fileio
import cifar_inception.training.optim as train_mod
from cifar_inception.checkpoint import load_checkpoint
from cifar_inception.cli import main
from cifar_inception.runs import locked

from synthetic_data import TINY, easy_data, write_image_tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    write_image_tree(easy_data(n_train=120, n_test=20), root)
    return root


def train_argv(tree: Path, runs: Path, *extra: str) -> list[str]:
    return ["train", TINY, "--data-dir", str(tree), "--epochs", "2", "--batch-size", "20",
            "--val-size", "20", "--output", str(runs), "--name", "run", "--threads", "1",
            "--no-test", *extra]


def one_error_line(err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("cifar-inception: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


def epochs_logged(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def crash_at_step(monkeypatch, step: int, exc: BaseException | None = None) -> None:
    """Make the ``step``-th training step raise ``exc`` (default: send ourselves SIGINT)."""
    calls = {"n": 0}
    real = train_mod.training_loss

    def loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            if exc is None:
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "training_loss", loss)


# 1. Ctrl-C in the first epoch: last.pt, exit 130, one line; --resume finishes the run.
def test_ctrl_c_in_the_first_epoch_exits_130(tmp_path, tree, monkeypatch, capsys):
    crash_at_step(monkeypatch, 2)
    assert main(train_argv(tree, tmp_path)) == 130
    one_error_line(capsys.readouterr().err, "interrupted", "--resume")
    run = tmp_path / "run"
    assert load_checkpoint(run / "last.pt")["training"]["position"]["epoch"] == 0
    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0
    assert epochs_logged(run) == [1, 2]


# 2. A crash before the first last.pt: both the same command and --resume start it again.
@pytest.mark.parametrize("again", ["same command", "resume"])
def test_run_that_died_before_its_first_checkpoint_starts_again(tmp_path, tree, monkeypatch,
                                                                 again, capsys):
    crash_at_step(monkeypatch, 2, RuntimeError("the machine went down"))
    with pytest.raises(RuntimeError):
        main(train_argv(tree, tmp_path))
    run = tmp_path / "run"
    assert (run / "config.json").is_file() and not (run / "last.pt").exists()
    monkeypatch.undo()
    argv = train_argv(tree, tmp_path) if again == "same command" else ["train", "--resume",
                                                                        str(run)]
    assert main(argv) == 0, capsys.readouterr().err
    assert epochs_logged(run) == [1, 2]


# 3. Two processes on one run folder: the second is refused at once, nothing is logged twice.
def test_second_run_on_a_locked_folder_is_refused(tmp_path, tree, capsys):
    argv = train_argv(tree, tmp_path, "--stop-after-epochs", "1")
    assert main(argv) == 0
    run = tmp_path / "run"
    with locked(run):  # as if another `train --resume` held it
        assert main(["train", "--resume", str(run)]) == 2
    one_error_line(capsys.readouterr().err, "in use by another training run")
    assert main(["train", "--resume", str(run)]) == 0  # released: it goes on
    assert epochs_logged(run) == [1, 2]


# 4. A full disk: one line, exit 1, no temporary left; the same command then works.
def test_full_disk_is_one_line_and_leaves_no_temporary(tmp_path, tree, monkeypatch, capsys):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "fsync", no_space)
    assert main(train_argv(tree, tmp_path)) == 1
    one_error_line(capsys.readouterr().err, "No space left on device")
    run = tmp_path / "run"
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert main(train_argv(tree, tmp_path)) == 0
    assert epochs_logged(run) == [1, 2]


# 5. Temporaries left by a kill -9 during a write are removed; other files are kept.
def test_stale_temporaries_are_removed_on_resume(tmp_path, tree):
    assert main(train_argv(tree, tmp_path, "--stop-after-epochs", "1")) == 0
    run = tmp_path / "run"
    for name in (".last.pt.k3j2h1.tmp", ".best.pt.x9y8z7.tmp", "notes.txt"):
        (run / name).write_bytes(b"half a file")
    assert main(["train", "--resume", str(run)]) == 0
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".") or
                  p.suffix == ".txt") == [".lock", "notes.txt"]


# 6. Values no run can have: one line each, exit 2.
@pytest.mark.parametrize("argv, message", [
    (["train", TINY, "--warmup-epochs", "inf"], "warm-up"),
    (["train", TINY, "--seed", "99999999999999999999"], "seed"),
    (["train", TINY, "--lr", "nan"], "learning rate"),
    (["serve", "nothing.pt", "--max-upload-mb", "inf"], "max-upload-mb"),
])
def test_impossible_values_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as info:  # argparse's own one-line errors exit 2 too
        code = main(argv)
        raise SystemExit(code)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err.splitlines()[-1]


# 7. A broken config.json or metrics.jsonl: resumed with a warning, the record rebuilt.
@pytest.mark.parametrize("record", ["[]", '{"resumed": 5}', "{not json"])
def test_resume_rebuilds_a_broken_record(tmp_path, tree, record, capsys):
    assert main(train_argv(tree, tmp_path, "--stop-after-epochs", "1")) == 0
    run = tmp_path / "run"
    (run / "config.json").write_text(record)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write("[1, 2]\n")
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "config.json" in out and "rebuilding it" in out
    assert "ignored 1 line" in out
    rebuilt = json.loads((run / "config.json").read_text())
    assert rebuilt["versions"]["torch"] and rebuilt["hardware"]["device"] == "cpu"
    assert rebuilt["config"]["model"] == TINY and len(rebuilt["resumed"]) == 1
    assert epochs_logged(run) == [1, 2]


# 0. Any other OS error (here: an output folder that is a file) is one line, exit 1.
def test_os_error_is_one_line_with_status_1(tmp_path, tree, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(train_argv(tree, blocker)) == 1
    one_error_line(capsys.readouterr().err, str(blocker))
