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


# 2b. A run that got further and lost its last.pt since (deleted to save space) is not a run
# that died in its first epoch: starting it again would delete its results. Refused.
@pytest.mark.parametrize("again", ["same command", "resume"])
def test_a_run_with_results_but_no_last_checkpoint_is_not_started_again(tmp_path, tree, again,
                                                                        capsys):
    assert main(train_argv(tree, tmp_path)) == 0
    run = tmp_path / "run"
    (run / "last.pt").unlink()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"}
    argv = train_argv(tree, tmp_path) if again == "same command" else ["train", "--resume",
                                                                        str(run)]
    assert main(argv) == 2
    one_error_line(capsys.readouterr().err, "holds a run's results (2 epochs)", "no last.pt")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"} == before


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
    (["serve", "nothing.pt", "--max-upload-mb", "1e308"], "max-upload-mb"),
    (["summary", "googlenet", "--num-classes", "100000000000000000000"], "num_classes"),
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
    assert (run / "config.json.broken").read_text() == record  # kept, not written over
    assert "kept as" in out
    assert rebuilt["versions"]["torch"] and rebuilt["hardware"]["device"] == "cpu"
    assert rebuilt["config"]["model"] == TINY and len(rebuilt["resumed"]) == 1
    assert epochs_logged(run) == [1, 2]


# 0. Any other OS error (here: an output folder that is a file) is one line, exit 1.
def test_os_error_is_one_line_with_status_1(tmp_path, tree, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(train_argv(tree, blocker)) == 1
    one_error_line(capsys.readouterr().err, str(blocker))


def full_argv(tree: Path, runs: Path, *extra: str) -> list[str]:
    """train_argv with the final test: the run is done only once eval.json is written."""
    return [arg for arg in train_argv(tree, runs, *extra) if arg != "--no-test"]


# 8. A .lock planted as a link is not followed: the file it points to keeps its content.
@pytest.mark.parametrize("how", ["resume", "new run"])
def test_a_lock_that_is_a_symlink_is_refused(tmp_path, tree, how, capsys):
    victim = tmp_path / "bashrc"
    victim.write_text("export PATH\n")
    run = tmp_path / "runs" / "run"
    if how == "resume":
        assert main(train_argv(tree, tmp_path / "runs", "--stop-after-epochs", "1")) == 0
        (run / ".lock").unlink()
        argv = ["train", "--resume", str(run)]
    else:
        run.mkdir(parents=True)
        argv = train_argv(tree, tmp_path / "runs")
    (run / ".lock").symlink_to(victim)
    capsys.readouterr()
    assert main(argv) == 2
    one_error_line(capsys.readouterr().err, ".lock", "symbolic link")
    assert victim.read_text() == "export PATH\n"


def test_a_lock_that_is_not_a_regular_file_is_refused(tmp_path, tree, capsys):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / ".lock")
    assert main(train_argv(tree, tmp_path)) == 2
    one_error_line(capsys.readouterr().err, ".lock", "not a regular file")


# 9. A run name is one folder inside --output, never a path out of it, and shows on one line.
@pytest.mark.parametrize("name", ["../../x", "..", "/tmp/x", "a/b", "two\nlines", "tab\there"])
def test_run_names_stay_inside_output(tmp_path, tree, name, capsys):
    runs = tmp_path / "deep" / "runs"
    argv = train_argv(tree, runs)
    argv[argv.index("--name") + 1] = name
    assert main(argv) == 2
    one_error_line(capsys.readouterr().err, "--name")
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing written anywhere


# 10. A last.pt of another model in the folder: refused before anything is written.
def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, tree, capsys):
    from small_model import SMALL, small_model
    import torch

    assert main(train_argv(tree, tmp_path, "--stop-after-epochs", "1")) == 0
    run = tmp_path / "run"
    foreign = load_checkpoint(run / "last.pt")
    foreign["model"].update(name=SMALL, options={"hidden": 4})
    foreign["training"]["config"].update(model=SMALL, model_options={"hidden": 4})
    foreign["state_dict"] = small_model().state_dict()
    torch.save(foreign, run / "last.pt")
    before = {name: (run / name).read_bytes() for name in ("config.json", "metrics.jsonl")}
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    one_error_line(capsys.readouterr().err, "last.pt", SMALL, TINY)
    assert {name: (run / name).read_bytes() for name in before} == before


# 11. Stopped after the last epoch, or in the final test: --resume finishes the test.
def test_ctrl_c_after_the_last_epoch_is_finished_by_resume(tmp_path, tree, monkeypatch,
                                                          capsys):
    crash_at_step(monkeypatch, 10)  # the last step of the last epoch (2 epochs of 5 steps)
    assert main(full_argv(tree, tmp_path)) == 130
    one_error_line(capsys.readouterr().err, "after epoch 2", "--resume")
    run = tmp_path / "run"
    assert not (run / "eval.json").exists()
    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "eval.json").read_text())["num_images"] == 20
    assert epochs_logged(run) == [1, 2]
    assert main(["train", "--resume", str(run)]) == 2  # now nothing is left to do
    one_error_line(capsys.readouterr().err, "epochs are done and tested")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_during_the_final_test_exits_130_and_resume_tests(tmp_path, tree, monkeypatch,
                                                                 signum, capsys):
    import cifar_inception.training.loop as loop_mod

    def stopped_test(*args, **kwargs):
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal did not stop the test")

    monkeypatch.setattr(loop_mod, "evaluate", stopped_test)
    assert main(full_argv(tree, tmp_path)) == 130
    one_error_line(capsys.readouterr().err, "during the test", "--resume")
    monkeypatch.undo()
    run = tmp_path / "run"
    assert main(["train", "--resume", str(run)]) == 0
    assert (run / "eval.json").is_file() and epochs_logged(run) == [1, 2]


# 12. Damaged records: a warning and the line dropped, or one line; never a traceback.
DAMAGED_LINES = {
    "nested": b'{"epoch": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "not UTF-8": b'{"epoch": 1, "val_acc": 0.5, "note": "\xff"}',
    "5,000 digits": b'{"epoch": 1, "val_acc": ' + b"9" * 5000 + b"}",
    "a word for a number": b'{"epoch": 1, "val_acc": "high"}',
}


@pytest.mark.parametrize("line", DAMAGED_LINES.values(), ids=DAMAGED_LINES.keys())
def test_resume_drops_a_damaged_metrics_line(tmp_path, tree, line, capsys):
    assert main(train_argv(tree, tmp_path, "--stop-after-epochs", "1")) == 0
    run = tmp_path / "run"
    with open(run / "metrics.jsonl", "ab") as handle:
        handle.write(line + b"\n")
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert epochs_logged(run) == [1, 2]  # the damaged line is gone


def test_resume_rebuilds_a_deeply_nested_record(tmp_path, tree, capsys):
    assert main(train_argv(tree, tmp_path, "--stop-after-epochs", "1")) == 0
    run = tmp_path / "run"
    (run / "config.json").write_text('{"config": ' + "[" * 100_000 + "]" * 100_000 + "}")
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert "rebuilding it" in capsys.readouterr().out
    assert epochs_logged(run) == [1, 2]


@pytest.mark.parametrize("config, words", [
    ('{"config": ' + "[" * 100_000 + "]" * 100_000 + "}", ("config.json", "nested")),
    ('{"config": {"data_dir": 5}}', ("data_dir", "--data-dir")),
    ('{"config": {"seed": ' + "7" * 5000 + "}}", ("config.json", "digits")),
])
def test_evaluate_refuses_a_damaged_record_in_one_line(tmp_path, tree, config, words, capsys):
    assert main(train_argv(tree, tmp_path, "--stop-after-epochs", "1")) == 0
    run = tmp_path / "run"
    (run / "config.json").write_text(config)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--no-write"]) == 2
    one_error_line(capsys.readouterr().err, *words)


# 13. Progress bars only on a terminal: a log file gets lines, not bar redraws.
def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, tree, capsys):
    assert main(train_argv(tree, tmp_path, "--epochs", "1")) == 0
    err = capsys.readouterr().err
    assert "%|" not in err and "\r" not in err, err


# 12. Unnamed runs started in the same second each get a folder of their own: the folder is
# created, not only looked for, so two processes cannot both take the first free name.
def test_unnamed_runs_in_one_second_get_folders_of_their_own(tmp_path, monkeypatch):
    import cifar_inception.runs as runs

    monkeypatch.setattr(runs.time, "strftime", lambda fmt: "20261207-120000")
    made = [runs.new_run_folder(tmp_path, None, "tiny") for _ in range(3)]
    assert [p.name for p in made] == ["tiny-20261207-120000", "tiny-20261207-120000-2",
                                      "tiny-20261207-120000-3"]
    assert all(p.is_dir() and not any(p.iterdir()) for p in made)


# 13. Resumed on other data (--data-dir may change from one resume to the next): other
# classes, whose head would not fit (a size-mismatch traceback before), or other images:
# refused, in one line.
def write_random_tree(root: Path, classes: tuple[str, ...], seed: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", 20), ("test", 4)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


@pytest.mark.parametrize("other, message", [
    (("ant", "bee", "cow", "dog"), "this run was trained on 3 classes (ant, bee, cow)"),
    (("ant", "bee", "cow"), "trained on other training images"),
])
def test_resume_on_other_data_is_refused(tmp_path, other, message, capsys):
    first = write_random_tree(tmp_path / "first", ("ant", "bee", "cow"), seed=0)
    second = write_random_tree(tmp_path / "second", other, seed=1)
    run = tmp_path / "runs" / "run"
    assert main(["train", TINY, "--data-dir", str(first), "--epochs", "2", "--batch-size",
                 "10", "--val-size", "6", "--output", str(run.parent), "--name", "run",
                 "--threads", "1", "--no-test", "--stop-after-epochs", "1"]) == 0
    assert main(["train", "--resume", str(run), "--data-dir", str(second)]) == 2
    one_error_line(capsys.readouterr().err, message)
    assert epochs_logged(run) == [1]
    assert main(["train", "--resume", str(run), "--data-dir", str(first)]) == 0
    assert epochs_logged(run) == [1, 2]
