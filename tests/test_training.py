"""The training loop on generated data: it learns, resumes exactly, survives kills, stops on NaN."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cifar_inception.training.optim as optim_mod
import cifar_inception.training.setup as setup_mod
from cifar_inception.augment import normalize
from cifar_inception.checkpoint import load_checkpoint
from cifar_inception.cli import main
from cifar_inception.errors import TrainingError
from cifar_inception.models import InceptionOutputs, create_model, list_models
from cifar_inception.recipes import CPU10_MODEL_OPTIONS, build_config
from cifar_inception.training import resume_config, train
from cifar_inception.training.optim import (
    build_optimizer,
    lr_factor,
    resolve_aux_weights,
    training_loss,
)

TESTS = Path(__file__).resolve().parent
from synthetic_data import TINY, easy_data, write_image_tree

METRIC_KEYS = {"epoch", "seconds", "train_loss", "train_acc", "val_loss", "val_acc", "lr"}


@pytest.fixture(scope="module")
def data():
    return easy_data(n_train=300, n_test=100)


def tiny_config(tmp_path, **overrides):
    settings = dict(epochs=3, batch_size=32, lr=0.1, val_size=60, warmup_epochs=0.5,
                    out_dir=str(tmp_path / "runs"), name="run", test=False, num_threads=1)
    settings.update(overrides)
    return build_config(TINY, "default", **settings)


def quiet(_line: str) -> None:
    pass


def weights(run_dir: Path, name: str = "last.pt") -> dict:
    return load_checkpoint(run_dir / name)["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


# --------------------------------------------------------------------------- pure pieces


def test_lr_schedules():
    total, warmup = 100, 10
    assert lr_factor(0, total, warmup, "onecycle") == pytest.approx(0.1)
    assert lr_factor(10, total, warmup, "onecycle") == pytest.approx(1.0)
    assert lr_factor(55, total, warmup, "onecycle") == pytest.approx(0.5)
    assert lr_factor(99, total, warmup, "onecycle") < 0.02
    assert lr_factor(55, total, warmup, "cosine") == pytest.approx(0.5)
    assert lr_factor(99, total, warmup, "cosine") < 0.001
    assert lr_factor(99, total, warmup, "constant") == 1.0
    assert lr_factor(0, total, 0, "constant") == 1.0


def test_weight_decay_skips_norms_and_biases():
    model = create_model("googlenet", width=0.125)
    optimizer = build_optimizer(tiny_config(Path("/unused"), weight_decay=1e-3), model)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 1e-3 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"])
    assert all(p.ndim <= 1 for p in plain["params"]) and len(plain["params"]) > 0
    assert isinstance(optimizer, torch.optim.SGD) and decayed["nesterov"]


def test_aux_weights_resolution(tmp_path):
    model = create_model("googlenet", width=0.125)  # two auxiliary heads, 0.3 each
    assert resolve_aux_weights(tiny_config(tmp_path), model) == (0.3, 0.3)
    assert resolve_aux_weights(tiny_config(tmp_path, aux_weights=1.0), model) == (1.0, 1.0)
    assert resolve_aux_weights(tiny_config(tmp_path, aux_weights=[0.1, 0.2]), model) == (0.1, 0.2)
    with pytest.raises(TrainingError, match="2 auxiliary head"):
        resolve_aux_weights(tiny_config(tmp_path, aux_weights=[0.1]), model)


def test_training_loss_adds_weighted_aux_losses():
    targets = torch.tensor([0, 1])
    main_logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    aux = torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    output = InceptionOutputs(main_logits, (aux,))
    loss, logits = training_loss(output, targets, (0.5,), 0.0)
    ce = torch.nn.functional.cross_entropy
    assert torch.allclose(loss, ce(main_logits, targets) + 0.5 * ce(aux, targets))
    assert logits is main_logits
    plain, _ = training_loss(main_logits, targets, (), 0.0)
    assert torch.allclose(plain, ce(main_logits, targets))


def test_models_that_learn_from_the_data_get_the_training_images(tmp_path, data):
    """inception-cpu whitens its stem from the data: train sets it before the first step."""
    config = build_config("inception-cpu", val_size=60, model_options={"width": 0.25})
    prepared = setup_mod.prepare_data(config, data, torch.device("cpu"))
    model = create_model("inception-cpu", width=0.25)
    untouched = model.stem_conv().weight.clone()
    setup_mod.init_from_data(model, prepared)
    expected = create_model("inception-cpu", width=0.25)
    expected.init_from_data(normalize(prepared.train_x[:setup_mod.INIT_IMAGES],
                                        prepared.mean, prepared.std))
    assert not torch.equal(model.stem_conv().weight, untouched)
    assert torch.equal(model.stem_conv().weight, expected.stem_conv().weight)


# --------------------------------------------------------------------------- runs


def test_run_folder_contents_and_learning(tmp_path, data):
    lines = []
    result = train(tiny_config(tmp_path, test=True), data, log=lines.append)
    run = result.run_dir
    assert result.status == "completed" and result.epoch == 3
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl", "last.pt",
                                               "best.pt", "eval.json"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(set(r) == METRIC_KEYS for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert max(r["val_acc"] for r in rows) > 0.5  # chance is 0.1
    record = json.loads((run / "config.json").read_text())
    assert record["config"]["model"] == TINY and record["config"]["lr"] == 0.1
    assert record["versions"]["torch"] == torch.__version__
    assert record["hardware"]["device"] == "cpu" and record["data"]["val_images"] == 60
    assert record["hardware"]["cpu"] and record["hardware"]["cpu_capability"]
    best = load_checkpoint(run / "best.pt")
    assert best["metrics"]["val_acc"] == max(r["val_acc"] for r in rows)
    assert best["data"]["classes"] == list(data.classes) and len(best["data"]["mean"]) == 3
    assert "optimizer" in load_checkpoint(run / "last.pt")["training"]
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["num_images"] == 100 and evaluation["test_top1"] > 0.5
    epoch_lines = [line for line in lines if line.startswith("Epoch ")]
    assert len(epoch_lines) == 3
    assert epoch_lines[0].startswith("Epoch 1/3 - ") and " - val_acc: " in epoch_lines[0]
    assert " - lr: " in epoch_lines[-1]


def test_fine_tuning_starts_from_the_given_weights(tmp_path, data):
    trained = train(tiny_config(tmp_path, name="first"), data, log=quiet).run_dir / "best.pt"
    # With a vanishing learning rate the run keeps what it starts from: the trained weights
    # (well above chance), not a fresh initialisation (about chance).
    still = dict(epochs=1, lr=1e-9, test=True, whiten_init=False)
    tuned = train(tiny_config(tmp_path, name="tuned", weights=str(trained), **still), data,
                  log=quiet)
    fresh = train(tiny_config(tmp_path, name="fresh", **still), data, log=quiet)
    assert tuned.test["test_top1"] > 0.5 > fresh.test["test_top1"]
    config = json.loads((tuned.run_dir / "config.json").read_text())["config"]
    assert config["weights"] == str(trained)


def test_no_validation_split_keeps_last_epoch_as_best(tmp_path, data):
    result = train(tiny_config(tmp_path, val_size=0, epochs=2), data, log=quiet)
    rows = result.history
    assert all(r["val_loss"] is None and r["val_acc"] is None for r in rows)
    assert load_checkpoint(result.run_dir / "best.pt")["metrics"]["epoch"] == 2


# model -> (options, recipe, overrides) of a short run that learns the easy task
SMALL_MODELS = {
    "googlenet": ({"width": 0.125}, "seed", {}),
    "inception-v3": ({"width": 0.125}, "seed", {}),
    "inception-cpu": ({"width": 0.25}, "default", {"lr": 0.2}),
    "inception-fast": ({"width": 0.25}, "default", {"lr": 0.2}),
    "baseline-plain": ({"width": 0.25}, "default", {"lr": 0.2}),
    "seed-googlenet": ({}, "seed", {}),
}
HEAVY_MODELS = ("seed-naive", "seed-inception-v2")  # 232M and 142M parameters


def test_every_registered_model_is_covered():
    real = {name for name in list_models() if not name.startswith("test-")}
    assert real == set(SMALL_MODELS) | set(HEAVY_MODELS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_small_models_beat_chance(tmp_path, name):
    """A short real run (20 steps of 16) on the easy generated task: the validation accuracy
    (60 images, chance 0.1) must clear 0.3. The Adam-based seed settings learn fastest in so
    few steps, except for the nets built for the default recipe's high learning rates."""
    options, recipe, overrides = SMALL_MODELS[name]
    data = easy_data(n_train=220, n_test=20, seed=1)
    config = build_config(name, recipe, epochs=2, batch_size=16, val_size=60,
                          out_dir=str(tmp_path), name=name, test=False, model_options=options,
                          num_threads=1, **overrides)
    result = train(config, data, log=quiet)
    best = max(r["val_acc"] for r in result.history)
    assert best > 0.3, f"{name}: validation accuracies {[r['val_acc'] for r in result.history]}"


@pytest.mark.slow
@pytest.mark.parametrize("name", HEAVY_MODELS)
def test_heavy_seed_models_learn(name, one_thread):
    """The report's two huge networks: three steps of the real loss and optimiser (Adam, the
    seed recipe's settings) on one batch of 6 images lower the loss on it at every step
    (measured in eval mode, without dropout's noise). A whole epoch here would take many
    minutes. The learning rate is 3e-5 instead of the recipe's 1e-3, which overshoots on a
    batch this small (the report trained with 1,250 batches per epoch)."""
    config = build_config(name, "seed", lr=3e-5)
    torch.manual_seed(0)
    model = create_model(name)
    optimizer = build_optimizer(config, model)
    aux_weights = resolve_aux_weights(config, model)
    data = easy_data(n_train=6, n_test=1, seed=2)
    x = (torch.as_tensor(data.train_images).permute(0, 3, 1, 2).float() - 128) / 64
    y = torch.as_tensor(data.train_labels)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(x), y))

    losses = [eval_loss()]
    for _ in range(3):
        model.train()
        loss, _ = training_loss(model(x), y, aux_weights, config.label_smoothing)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(eval_loss())
    assert all(math.isfinite(v) for v in losses), losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


# --------------------------------------------------------------------------- resume


def test_pause_and_resume_equals_uninterrupted(tmp_path, data):
    options = {"dropout": 0.3}  # dropout draws from the global RNG: it must be restored too
    straight = train(tiny_config(tmp_path / "a", model_options=options), data, log=quiet)
    paused = train(tiny_config(tmp_path / "b", model_options=options, stop_after_epochs=1),
                   data, log=quiet)
    assert paused.status == "paused" and paused.epoch == 1
    assert "--resume" in paused.message
    resumed = train(resume_config(paused.run_dir), data, resume=paused.run_dir, log=quiet)
    assert resumed.status == "completed" and resumed.epoch == 3
    assert_same_weights(weights(straight.run_dir), weights(resumed.run_dir))
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in straight.history]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history] == strip


def test_ctrl_c_mid_epoch_saves_and_resumes_exactly(tmp_path, data, monkeypatch):
    options = {"dropout": 0.3}
    straight = train(tiny_config(tmp_path / "a", model_options=options), data, log=quiet)

    calls = {"n": 0}
    real_loss = optim_mod.training_loss

    def loss_then_ctrl_c(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # epoch 2, step 2 of 7: as if the user pressed Ctrl-C here
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(optim_mod, "training_loss", loss_then_ctrl_c)
    handler_before = signal.getsignal(signal.SIGINT)  # (ignored when started in the background)
    stopped = train(tiny_config(tmp_path / "b", model_options=options), data, log=quiet)
    monkeypatch.setattr(optim_mod, "training_loss", real_loss)
    assert stopped.status == "interrupted" and stopped.epoch == 1
    position = load_checkpoint(stopped.run_dir / "last.pt")["training"]["position"]
    assert (position["epoch"], position["step"]) == (1, 2)
    assert "--resume" in stopped.message
    assert signal.getsignal(signal.SIGINT) is handler_before  # our handler removed
    resumed = train(None, data, resume=stopped.run_dir, log=quiet)
    assert_same_weights(weights(straight.run_dir), weights(resumed.run_dir))
    assert resumed.history[1]["train_loss"] == pytest.approx(
        straight.history[1]["train_loss"], rel=1e-12)


def fast_clock(monkeypatch, seconds_a_look: float) -> None:
    """The training loop's clock moves ``seconds_a_look`` each time the loop reads it."""
    import types

    import cifar_inception.training.loop as loop_mod

    clock = {"now": 0.0}

    def perf_counter():
        clock["now"] += seconds_a_look
        return clock["now"]

    monkeypatch.setattr(loop_mod, "time", types.SimpleNamespace(perf_counter=perf_counter,
                                                                time=time.time))


def test_long_epochs_save_on_their_way_and_a_kill_resumes_exactly(tmp_path, data, monkeypatch):
    import shutil

    import cifar_inception.training.loop as loop_mod

    options = {"dropout": 0.3}
    straight = train(tiny_config(tmp_path / "a", model_options=options), data, log=quiet)
    fast_clock(monkeypatch, 25.0)  # save_every=60: a save every 3rd step or so
    midway = []
    real_save = loop_mod.save_checkpoint

    def save_and_keep_the_first(path, checkpoint):
        real_save(path, checkpoint)
        position = checkpoint.get("training", {}).get("position", {})
        if position.get("step", 0) > 0:
            midway.append((position["epoch"], position["step"]))
            if len(midway) == 1:  # the folder as a kill right after this save would leave it
                shutil.copytree(path.parent, tmp_path / "killed")

    monkeypatch.setattr(loop_mod, "save_checkpoint", save_and_keep_the_first)
    saving = train(tiny_config(tmp_path / "b", model_options=options, save_every=60), data,
                   log=quiet)
    monkeypatch.undo()
    assert saving.status == "completed" and len(midway) >= 3, midway
    assert_same_weights(weights(straight.run_dir), weights(saving.run_dir))
    (tmp_path / "killed" / ".lock").unlink(missing_ok=True)
    resumed = train(None, data, resume=tmp_path / "killed", log=quiet)
    assert resumed.status == "completed" and resumed.epoch == 3
    assert_same_weights(weights(straight.run_dir), weights(resumed.run_dir))
    assert [r["train_loss"] for r in resumed.history] == pytest.approx(
        [r["train_loss"] for r in straight.history], rel=1e-12)


def test_save_every_is_bounded(tmp_path):
    from cifar_inception.options import ConfigError

    for bad in (5, -1, True, float("nan")):
        with pytest.raises(ConfigError, match="save-every must be 0 .off., or at least 60"):
            tiny_config(tmp_path, save_every=bad)


def test_save_every_off_never_saves_midway(tmp_path, data, monkeypatch):
    import cifar_inception.training.loop as loop_mod
    from cifar_inception.recipes import parse_save_every

    assert parse_save_every("off") == parse_save_every(" Never ") == parse_save_every("0") == 0
    assert parse_save_every("2m") == 120
    fast_clock(monkeypatch, 3600.0)  # an hour a look: any save_every above 0 would save
    steps = []
    real_save = loop_mod.save_checkpoint

    def record(path, checkpoint):
        real_save(path, checkpoint)
        steps.append(checkpoint.get("training", {}).get("position", {}).get("step", 0))

    monkeypatch.setattr(loop_mod, "save_checkpoint", record)
    result = train(tiny_config(tmp_path, save_every=0), data, log=quiet)
    assert result.status == "completed" and steps and not any(steps), steps


def test_resume_refuses_changes_and_finished_runs(tmp_path, data):
    run = train(tiny_config(tmp_path, epochs=1), data, log=quiet).run_dir
    with pytest.raises(TrainingError, match="cannot change lr"):
        resume_config(run, lr=0.5)
    with pytest.raises(TrainingError, match="all 1 epochs are done"):
        train(resume_config(run), data, resume=run, log=quiet)
    longer = train(resume_config(run, epochs=2), data, resume=run, log=quiet)
    assert longer.epoch == 2 and [r["epoch"] for r in longer.history] == [1, 2]


def test_existing_run_name_is_refused(tmp_path, data):
    train(tiny_config(tmp_path, epochs=1), data, log=quiet)
    with pytest.raises(TrainingError, match="already exists"):
        train(tiny_config(tmp_path, epochs=1), data, log=quiet)


# --------------------------------------------------------------------------- failures


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data, monkeypatch):
    calls = {"n": 0}
    real_loss = optim_mod.training_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, logits = real_loss(*args, **kwargs)
        return (loss * float("nan") if calls["n"] > 10 else loss), logits  # epoch 2

    monkeypatch.setattr(optim_mod, "training_loss", poisoned)
    with pytest.raises(TrainingError, match="NaN or infinite in epoch 2") as info:
        train(tiny_config(tmp_path), data, log=quiet)
    assert "last good checkpoint" in str(info.value)
    run = tmp_path / "runs" / "run"
    last = load_checkpoint(run / "last.pt")
    assert last["metrics"]["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_huge_learning_rate_diverges_with_a_clear_message(tmp_path, data):
    with pytest.raises(TrainingError, match="NaN or infinite.*lower --lr"):
        train(tiny_config(tmp_path, lr=1e12, warmup_epochs=0), data, log=quiet)


def test_training_split_smaller_than_a_batch(tmp_path, data):
    with pytest.raises(TrainingError, match="fewer than one batch"):
        train(tiny_config(tmp_path, batch_size=1024), data, log=quiet)


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import synthetic_data  # registers the tiny model
from cifar_inception.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _wait_for_rows(process: subprocess.Popen, metrics: Path, rows: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"training stopped early or stalled: {process.stderr.read()}")


@pytest.mark.slow
def test_ctrl_c_then_kill_9_then_resume(tmp_path):
    """In a real process: Ctrl-C exits 130 with one line and a resumable last.pt; kill -9
    (no handler runs, whatever was being written stays half-written) leaves a whole last.pt
    thanks to atomic writes; and the run then resumes to the end."""
    tree = tmp_path / "tree"
    write_image_tree(easy_data(n_train=300, n_test=20), tree)
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(tests=str(TESTS)))
    env = dict(os.environ, CIFAR_INCEPTION_CACHE=str(tmp_path / "cache"))
    run = tmp_path / "runs" / "run"
    metrics = run / "metrics.jsonl"

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), *args], env=env, text=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    first = start("train", TINY, "--data-dir", str(tree), "--epochs", "400", "--batch-size",
                  "20", "--val-size", "0", "--output", str(tmp_path / "runs"), "--name", "run",
                  "--no-test", "--threads", "1")
    _wait_for_rows(first, metrics, 2)
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=60) == 130
    lines = [line for line in first.stderr.read().splitlines() if "interrupted" in line]
    assert len(lines) == 1, lines  # (the data loader's progress bar also writes to stderr)
    assert lines[0].startswith("cifar-inception: interrupted") and "--resume" in lines[0]
    stopped = load_checkpoint(run / "last.pt")["training"]["position"]

    second = start("train", "--resume", str(run))
    _wait_for_rows(second, metrics, stopped["epoch"] + 3)
    second.kill()
    second.wait()
    done = load_checkpoint(run / "last.pt")["training"]["position"]["epoch"]
    assert done >= stopped["epoch"] + 2

    third = subprocess.run([sys.executable, str(script), "train", "--resume", str(run),
                            "--epochs", str(done + 1)], env=env, capture_output=True,
                           text=True, timeout=120)
    assert third.returncode == 0, third.stderr
    assert load_checkpoint(run / "last.pt")["training"]["position"]["epoch"] == done + 1
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, done + 2))


# --------------------------------------------------------------------------- command line


def test_cli_train_then_evaluate(tmp_path, capsys):
    tree = tmp_path / "tree"
    write_image_tree(easy_data(n_train=200, n_test=30), tree)
    code = main(["train", TINY, "--data-dir", str(tree), "--epochs", "2", "--batch-size",
                 "20", "--lr", "0.1", "--val-size", "40", "--output", str(tmp_path / "runs"),
                 "--name", "cli", "--option", "channels=4", "--aux-weights", "0.25",
                 "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Epoch 2/2 - " in out and "test (best.pt" in out
    run = tmp_path / "runs" / "cli"
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["model_options"] == {"channels": 4} and config["aux_weights"] == 0.25
    assert config["recipe"] == "default" and config["lr"] == 0.1
    assert config["data_dir"] == str(tree.resolve())
    assert main(["evaluate", str(run)]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "confusion matrix" in out and "airplane" in out


@pytest.mark.parametrize("argv, message", [
    (["train", "no-such-model", "--epochs", "1"], "unknown model"),
    (["train", TINY, "--epochs", "0"], "epochs must be >= 1"),
    (["train", TINY, "--lr", "-1"], "learning rate must be > 0"),
    (["train", TINY, "--device", "cuda:0", "--no-download", "--data-dir", "/nonexistent"],
     "CUDA is not available"),
    (["train", "--resume", "/nonexistent/run"], "nothing to resume"),
    (["train", TINY, "--resume", "/nonexistent/run"], "give no MODEL"),
    (["train", TINY, "--option", "nonsense"], "not of the form key=value"),
])
def test_cli_user_errors_exit_2(argv, message, capsys):
    if "CUDA" in message and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cifar-inception: error: ") and message in err
    assert "Traceback" not in err


def test_cli_resume_with_changed_option_exits_2(tmp_path, data, capsys):
    run = train(tiny_config(tmp_path, epochs=1), data, log=quiet).run_dir
    assert main(["train", "--resume", str(run), "--lr", "0.3"]) == 2
    assert "cannot change lr" in capsys.readouterr().err


def test_cli_without_model_picks_by_hardware(tmp_path, capsys):
    """No MODEL and no recipe: the CPU recipe, said out loud (shrunk here to a few steps)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    tree = tmp_path / "tree"
    write_image_tree(easy_data(n_train=60, n_test=10), tree)
    code = main(["train", "--data-dir", str(tree), "--epochs", "1", "--batch-size", "20",
                 "--val-size", "20", "--width", "0.25", "--output", str(tmp_path / "runs"),
                 "--name", "auto", "--no-test", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "found no GPU, so recipe 'cpu10'" in out
    config = json.loads((tmp_path / "runs" / "auto" / "config.json").read_text())["config"]
    assert config["model"] == "inception-cpu" and config["recipe"] == "cpu10"
    assert config["model_options"] == {**CPU10_MODEL_OPTIONS, "width": 0.25}  # recipe's, ours


# ------------------------------------------------------------- time-to-accuracy tricks


def speed_config(tmp_path, **overrides):
    """The cpu10 recipe on a tiny inception-cpu and the easy task, a few steps long."""
    # The recipe's learning rate is for batches of 1024; these are of 20. At 0.4 the
    # validation accuracy collapsed to chance for an epoch or two and ended anywhere from
    # 0.3 to 0.8 depending on the CPU's rounding (fp32 or bf16); at 0.1 it rises steadily
    # to 0.6-0.8 with either precision and any of the seeds tried.
    settings = dict(epochs=6, batch_size=20, lr=0.1, val_size=60, out_dir=str(tmp_path / "runs"),
                    name="run", test=False, num_threads=1, model_options={"width": 0.25})
    settings.update(overrides)
    return build_config(None, "cpu10", **settings)


def test_lr_schedule_can_end_above_zero():
    total, warmup = 100, 10
    assert lr_factor(10, total, warmup, "onecycle", 0.07) == pytest.approx(1.0)
    assert lr_factor(100, total, warmup, "onecycle", 0.07) == pytest.approx(0.07)
    assert lr_factor(55, total, warmup, "onecycle", 0.2) == pytest.approx(0.6)
    assert lr_factor(100, total, warmup, "cosine", 0.1) == pytest.approx(0.1)


def test_norm_bias_learning_rate_multiplier():
    model = create_model("inception-cpu", width=0.25)
    optimizer = build_optimizer(speed_config(Path("/unused"), norm_bias_lr=64.0), model)
    weights_group, norms_group = optimizer.param_groups
    assert weights_group["lr_scale"] == 1.0 and norms_group["lr_scale"] == 64.0
    # the batch norms' frozen scales are no parameters to train
    assert all(p.requires_grad for g in optimizer.param_groups for p in g["params"])


def test_lookahead_resets_to_the_average_and_ends_on_it():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    lookahead = optim_mod.Lookahead(model, every=2, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    lookahead.after_step(1, 4)                # not a multiple of 2: nothing happens
    assert model.weight.eq(1.0).all()
    lookahead.after_step(2, 4)                # decay 0.25 * (2/4)^3: mostly the new weights
    expected = 1.0 - 0.5 ** 2 * 0.5 ** 3
    assert torch.allclose(model.weight, torch.full_like(model.weight, expected))
    with torch.no_grad():
        model.weight.fill_(5.0)
    lookahead.after_step(4, 4)                # the last step: the average replaces the weights
    assert torch.allclose(model.weight, torch.full_like(model.weight, expected))


def test_whitening_stem_is_frozen_and_its_bias_trains_only_as_long_as_asked(tmp_path, data):
    never = train(speed_config(tmp_path / "a", epochs=2, whiten_bias_epochs=0.0), data,
                  log=quiet)
    always = train(speed_config(tmp_path / "b", epochs=2, whiten_bias_epochs=2.0), data,
                   log=quiet)
    model = create_model("inception-cpu", width=0.25)
    prepared = setup_mod.prepare_data(speed_config(tmp_path), data, torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runs: a covariance's float sums follow the threads
    try:
        setup_mod.init_from_data(model, prepared)
    finally:
        torch.set_num_threads(threads)
    for run in (never, always):  # the weights stay exactly the whitening
        stem = weights(run.run_dir)["stem.0.weight"]
        assert torch.equal(stem, model.stem[0].weight.detach().to(stem))
    assert weights(never.run_dir)["stem.0.bias"].eq(0).all()
    assert not weights(always.run_dir)["stem.0.bias"].eq(0).all()


@pytest.mark.slow
def test_cpu10_recipe_learns_and_resumes_exactly(tmp_path, data):
    """bf16 and channels_last on the CPU, lookahead, alternating flips, TTA: a run that
    learns, and a paused-and-resumed one that ends with the same weights."""
    straight = train(speed_config(tmp_path / "a", test=True), data, log=quiet)
    # Chance is 0.1; runs end at 0.6 or more, so 0.4 leaves a margin no rounding crosses.
    assert straight.history[-1]["val_acc"] > 0.4
    assert straight.test["tta"] is True and straight.test["test_top1"] > 0.4
    paused = train(speed_config(tmp_path / "b", stop_after_epochs=3), data, log=quiet)
    assert "lookahead" in load_checkpoint(paused.run_dir / "last.pt")["training"]
    resumed = train(resume_config(paused.run_dir), data, resume=paused.run_dir, log=quiet)
    assert_same_weights(weights(straight.run_dir), weights(resumed.run_dir))


def test_epoch_end_hook_sees_every_epoch(tmp_path, data):
    seen = []

    def hook(row, model, mean, std):
        assert isinstance(model, torch.nn.Module) and len(mean) == len(std) == 3
        seen.append(row["epoch"])

    train(tiny_config(tmp_path, epochs=2), data, log=quiet, epoch_end=hook)
    assert seen == [1, 2]


def test_each_trick_can_be_switched_off(tmp_path, data):
    config = speed_config(tmp_path, epochs=1, lookahead=False, whiten_init=False,
                          whiten_bias_epochs=None, flip_mode="random", cpu_amp=False,
                          cpu_channels_last=False, tta=False, norm_bias_lr=1.0)
    result = train(config, data, log=quiet)
    assert result.status == "completed"
    assert "lookahead" not in load_checkpoint(result.run_dir / "last.pt")["training"]
