"""Training in several processes that train_in_processes() starts (--processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cifar_inception.errors import CifarInceptionError, TrainingError
from cifar_inception.launch import under_launcher
from cifar_inception.recipes import build_config
from cifar_inception.training import resume_config, train, train_in_processes

TESTS = Path(__file__).resolve().parent

from synthetic_data import easy_data, write_image_tree

# Known to fail now and then on a 2-core machine: a rank aborted at the end of a run
# ("terminate called without an active exception"), or a rank waited out the collective
# timeout for the other. Causes fixed so far: a budget's speed probe took a timed, so
# rank-dependent, number of all-reducing steps (now a counted one); a rank left the process
# group while another still used it (now every rank waits for the others first); a Ctrl-C
# seen at an epoch's end by one rank only stopped that rank alone (now the ranks agree); a
# budget plan used each rank's own time for saving an epoch, so ranks could plan different
# epochs and one re-planned (an all-reduce) where the other did not (found by tracing each
# rank's collectives; now taken over the ranks, test_budget.py). Kept non-strict until the
# fix has run long enough to trust; --processes defaults to 1.
FLAKY = pytest.mark.xfail(strict=False, reason="--processes ranks can fall out of step at "
                          "the end of a run")


# The ranks are new processes: they know the project's models, not the tests' own.
MODEL, OPTIONS = "inception-cpu", {"width": 0.25}


def config_for(tmp_path, **overrides):
    settings = dict(epochs=2, batch_size=64, lr=0.05, val_size=40, processes=2,
                    out_dir=str(tmp_path / "runs"), name="run", num_threads=1,
                    model_options=OPTIONS)
    settings.update(overrides)
    return build_config(MODEL, "default", **settings)


@FLAKY
def test_two_processes_train_one_run(tmp_path):
    assert not under_launcher()
    lines = []
    result = train_in_processes(config_for(tmp_path), easy_data(n_train=200, n_test=40), log=lines.append)
    assert result.status == "completed" and len(result.history) == 2
    assert result.test is not None and 0 <= result.test["test_top1"] <= 1
    record = json.loads((result.run_dir / "config.json").read_text())
    assert record["hardware"]["world_size"] == 2 and record["config"]["processes"] == 2
    assert any(" x2: " in line for line in lines)  # rank 0's log reached the caller
    assert any(line.startswith("Epoch 2/2") for line in lines)


def test_a_failing_rank_is_one_error_with_its_message(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the run folder would go")
    with pytest.raises(TrainingError, match="runs") as raised:
        train_in_processes(config_for(tmp_path), easy_data(n_train=200, n_test=40), log=lambda _: None)
    assert "\n" not in str(raised.value)


@FLAKY
def test_ctrl_c_stops_every_process_and_the_run_resumes(tmp_path):
    tree = tmp_path / "tree"
    write_image_tree(easy_data(n_train=400, n_test=20), tree)
    command = [sys.executable, "-m", "cifar_inception", "train", MODEL, "--width", "0.25",
               "--data-dir", str(tree), "--epochs", "200", "--batch-size", "32",
               "--val-size", "40", "--processes", "2", "--threads", "1", "--output",
               str(tmp_path / "runs"), "--name", "run", "--no-test"]
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent / "src")}
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    metrics = tmp_path / "runs" / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out, err = job.communicate(timeout=120)
    assert job.returncode == 130, err
    assert "interrupted" in err and "--resume" in err
    run = tmp_path / "runs" / "run"
    result = train_in_processes(resume_config(run, epochs=len(json.loads(
        "[" + ",".join(metrics.read_text().splitlines()) + "]")) + 1), resume=run,
        log=lambda _: None)
    assert result.status == "completed"
    assert json.loads((run / "config.json").read_text())["config"]["processes"] == 2


@FLAKY
def test_a_budget_split_into_processes_ends_in_step(tmp_path):
    """Every rank plans, and plans again after each epoch, the same steps (a rank that
    planned one step more would wait forever for the others)."""
    config = config_for(tmp_path, budget=20.0, dist_timeout=60.0, test=False)
    started = time.perf_counter()
    result = train_in_processes(config, easy_data(n_train=400, n_test=20), log=lambda _: None)
    assert result.status == "completed"
    assert time.perf_counter() - started < 60
    record = json.loads((result.run_dir / "config.json").read_text())
    recorded, plan = record["config"], record["plan"]
    assert recorded["budget"] == 20.0 and len(result.history) == plan["epochs"]


def test_one_process_unless_more_are_asked_for(tmp_path):
    config = config_for(tmp_path, processes=None, epochs=1, test=False)
    result = train(config, easy_data(n_train=200, n_test=40), log=lambda _: None)
    record = json.loads((result.run_dir / "config.json").read_text())
    assert record["plan"]["processes"] == 1 and record["hardware"]["world_size"] == 1


@pytest.mark.parametrize("processes, batch, cores, message", [
    (3, 64, 4, "batch size 64 is not divisible by the 3 processes"),
    (3, 63, 2, "--processes 3: more than the 2 cores"),
])
def test_processes_that_cannot_train_are_refused_before_any_starts(tmp_path, monkeypatch,
                                                                  processes, batch, cores,
                                                                  message):
    import cifar_inception.training.ranks as ranks

    monkeypatch.setattr(ranks, "usable_cores", lambda: cores)
    started = []
    monkeypatch.setattr(ranks, "run_ranks", lambda *args: started.append(args) or [0])
    config = config_for(tmp_path, processes=processes, batch_size=batch)
    with pytest.raises(CifarInceptionError, match=message):
        train_in_processes(config, easy_data(n_train=200, n_test=40))
    assert not started and not (tmp_path / "runs").exists()
