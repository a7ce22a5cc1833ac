"""The time budget: steps from measured rates, schedules as fractions, a run that fits."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from types import SimpleNamespace

import pytest
import torch
from synthetic_data import TINY, easy_data

from cifar_inception.budget import (
    TARGET,
    TTA_SHARE,
    BudgetError,
    Plan,
    Rates,
    affordable_views,
    plan,
    time_per_call,
)
from cifar_inception.devices import cpu_precision
from cifar_inception.options import parse_duration
from cifar_inception.recipes import MAX_BUDGET_S, ConfigError, build_config
from cifar_inception.training import budgeting, train
from cifar_inception.training.fitting import widen_for_budget
from cifar_inception.training.optim import lr_factor
from cifar_inception.training.plan import Surroundings, plan_run
from cifar_inception.training.setup import Loop


def test_plan_takes_the_most_steps_whose_validations_and_test_fit():
    rates = Rates(step_s=0.5, val_image_s=0.001, test_image_s=0.002)
    result = plan(100.0, 10.0, rates, steps_per_epoch=20, val_images=1000, test_images=1000)
    # 100 x 0.985 - 10 elapsed - 2 s of test = 86.5 s; each epoch's validation and
    # overhead take 1.3 s, so 8 epochs leave 76.1 s: 152 steps (a 9th epoch would not start).
    assert (result.train_steps, result.epochs) == (152, 8)
    assert result.expected_s == pytest.approx(10 + 152 * 0.5 + 8 * 1.3 + 2)
    assert result.expected_s <= 100 * TARGET


def test_plan_of_whole_epochs_when_the_budget_is_large():
    rates = Rates(step_s=0.01, val_image_s=0.0, test_image_s=0.0)
    result = plan(3600.0, 0.0, rates, steps_per_epoch=10, val_images=0, test_images=0)
    assert result.train_steps > 10 * result.epochs - 10
    assert result.expected_s <= 3600 * TARGET


def test_a_budget_too_small_for_one_step_is_refused():
    rates = Rates(step_s=8.0, val_image_s=0.01, test_image_s=0.01)
    with pytest.raises(BudgetError, match="give a larger --budget"):
        plan(10.0, 2.0, rates, steps_per_epoch=10, val_images=100, test_images=100)


def test_test_time_views_are_kept_while_their_extra_cost_fits_the_share():
    # 10,000 test images at 1 ms each: every view beyond the first costs 10 s
    assert TTA_SHARE == 0.08
    assert affordable_views(20 * 60, 10000, 1e-3, (2, 6)) == 6    # 50 s of 96 s
    assert affordable_views(10 * 60, 10000, 1e-3, (2, 6)) == 2    # 50 s > 48 s; 10 s fits
    assert affordable_views(150, 10000, 1e-3, (2, 6)) == 2        # 10 s of 12 s
    assert affordable_views(120, 10000, 1e-3, (2, 6)) == 0        # 10 s > 9.6 s
    assert affordable_views(20 * 60, 10000, 1e-3, (2,)) == 2      # never more than asked


def test_time_per_call_counts_only_the_timed_calls():
    calls = []
    seconds = time_per_call(lambda: calls.append(1), min_seconds=0.0, min_calls=3)
    assert len(calls) == 4 and seconds >= 0  # one untimed call first


@pytest.mark.parametrize("text, seconds", [("600", 600), ("90s", 90), ("10m", 600),
                                           ("1h", 3600), ("1h30m", 5400), ("2.5m", 150)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "10x", "-5m", "m", "1..2", "1.5.5",
                                  "1" * 34 + "sec", "1" * 400, "1" * 30 + "x" + "1" * 30])
def test_bad_durations_are_refused(text):
    """Refused at once: a pattern that backtracked once took time doubling with each digit
    of "1111...1sec" (this test would then never end)."""
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("budget", [0.0, -1.0, MAX_BUDGET_S + 1, 2e15 * 3600, math.inf,
                                    math.nan, "10m", True])
def test_budgets_beyond_a_week_or_not_positive_are_refused(budget):
    with pytest.raises(ConfigError, match="budget must be more than 0 seconds and at most a "
                                          "week"):
        build_config(None, "cpu10", budget=budget)
    assert build_config(None, "cpu10", budget=MAX_BUDGET_S).budget == MAX_BUDGET_S


@pytest.mark.parametrize("budget", ["2000000000000000h", "100000h", "1000000000"])
def test_an_absurd_budget_is_one_line_before_any_data_is_read(budget, capsys):
    from cifar_inception.cli import main

    assert main(["train", "--budget", budget, "--no-download", "--data-dir",
                 "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cifar-inception: error: budget must be") and err.count("\n") == 1


@pytest.mark.parametrize("processes", [None, 2])
def test_a_budget_counts_the_whole_command(monkeypatch, processes):
    """The command's own start (torch's import, the recipe, ...) is part of the budget."""
    import cifar_inception.cli
    import cifar_inception.training as training

    calls = []

    def record(config, data=None, *, resume=None, log=None, started_at=None):
        calls.append(started_at)
        return SimpleNamespace(status="completed")

    monkeypatch.setattr(training, "train", record)
    monkeypatch.setattr(training, "train_in_processes", record)
    monkeypatch.setattr(cifar_inception.cli.time, "time", lambda: 1000.0)
    argv = ["train", "--budget", "60", "--no-download", "--data-dir", "/nonexistent"]
    assert cifar_inception.cli.main(argv + (["--processes", "2"] if processes else [])) == 0
    assert calls == [1000.0]


def loop_for(config, steps_per_epoch):
    """A Loop that only knows its plan (enough for the schedules)."""
    plan = plan_run(config, steps_per_epoch, Surroundings(False, None, None, 1))
    return Loop(config, plan, None, None, None, None, None, None, (), None)


def test_schedules_are_fractions_of_the_run_whatever_its_length():
    for steps in (37, 3700):
        config = build_config(TINY, "default", train_steps=steps, warmup_fraction=0.2,
                              whiten_bias_fraction=0.25, final_lr=0.07)
        loop = loop_for(config, steps_per_epoch=10)
        assert loop.total_steps == steps
        assert loop.warmup_steps == round(0.2 * steps)
        assert loop.whiten_bias_steps == round(0.25 * steps)
        assert loop.lr_at(loop.warmup_steps) == pytest.approx(config.lr)
        assert loop.lr_at(steps) == pytest.approx(0.07 * config.lr)
        assert loop.steps_in_epoch(steps // 10) == steps % 10  # the last epoch is cut short


def test_schedules_in_epochs_without_fractions():
    config = build_config(TINY, "default", epochs=4, warmup_epochs=0.5)
    loop = loop_for(config, steps_per_epoch=10)
    assert (loop.total_steps, loop.warmup_steps, loop.whiten_bias_steps) == (40, 5, None)
    assert lr_factor(5, 40, 5, "onecycle", 0.0) == pytest.approx(1.0)


def test_an_explicit_epoch_length_beats_the_recipes_fraction():
    config = build_config(None, "cpu10", warmup_epochs=2.0, whiten_bias_epochs=1.0)
    assert config.warmup_fraction is None and config.whiten_bias_fraction is None
    assert build_config(None, "cpu10").warmup_fraction == pytest.approx(0.23)


def test_epochs_replace_the_recipes_budget():
    assert build_config(None, "cpu10").budget == 600
    assert build_config(None, "cpu10", epochs=3).budget is None


@pytest.mark.slow
def test_a_budget_run_ends_within_its_budget(tmp_path):
    """The run measures itself, plans, and ends (with validation and test) in time."""
    budget = 25.0
    config = build_config(TINY, "default", budget=budget, batch_size=32, lr=0.1, val_size=100,
                          warmup_fraction=0.2, out_dir=str(tmp_path / "runs"), name="run",
                          num_threads=1, tta=True, widen_for_epochs=2)
    lines = []
    started = time.perf_counter()
    result = train(config, easy_data(n_train=600, n_test=200), log=lines.append)
    elapsed = time.perf_counter() - started
    assert result.status == "completed" and result.test is not None
    assert any(line.startswith(f"budget {budget:.0f}s:") for line in lines)
    # what was asked (config) apart from what the run decided (plan)
    record = json.loads((result.run_dir / "config.json").read_text())
    recorded = record["plan"]
    assert recorded["total_steps"] >= 2 and record["config"]["budget"] == budget
    assert len(result.history) == recorded["epochs"]
    # the widening measured wider models and kept one (a few epochs of TinyNet are cheap)
    assert recorded["model_options"]["width"] > 1
    assert any(line.startswith(f"width {recorded['model_options']['width']:g}: the widest")
               for line in lines)
    # The plan aims at 98.5% of the budget; 10% of grace for a machine that slows meanwhile.
    assert elapsed <= budget * 1.10, f"{elapsed:.1f} s for a budget of {budget} s"
    assert elapsed >= budget * 0.5  # it used the time, rather than stopping at once
    assert torch.get_num_threads() >= 1


class FakeLoop:
    """What widen_for_budget reads of a loop: its config, the model's options and the steps
    of an epoch; ``build`` makes one of other model options."""

    def __init__(self, config, model_options=None):
        self.config, self.steps_per_epoch = config, 100
        self.model_options = config.model_options if model_options is None else model_options

    def build(self, model_options):
        return FakeLoop(self.config, model_options)


def fake_plans(monkeypatch, epochs_at_width_1: float):
    """Plans whose epochs fall with the square of the width, as a conv net's cost grows;
    the widths measured, in order."""
    measured = []

    def plan_budget(loop, test_images, started):
        width = loop.model_options.get("width", 1.0)
        measured.append(width)
        steps = round(100 * epochs_at_width_1 / width ** 2)
        return Plan(steps, math.ceil(steps / 100), 1.0, Rates(0.1, 0.0, 0.0))

    monkeypatch.setattr(budgeting, "plan_budget", plan_budget)
    return measured


def widen(config, monkeypatch, epochs_at_width_1):
    measured = fake_plans(monkeypatch, epochs_at_width_1)
    loop = FakeLoop(config)
    first = budgeting.plan_budget(loop, 0, 0.0)
    lines = []
    loop, chosen, _ = widen_for_budget(loop, first, loop.build, 0, 0.0, lines.append)
    return loop.model_options.get("width", 1.0), chosen, measured[1:], lines


def test_widening_keeps_the_widest_model_that_still_gets_its_epochs(monkeypatch):
    config = build_config("inception-cpu", "cpu10", widen_for_epochs=8)
    width, chosen, measured, lines = widen(config, monkeypatch, epochs_at_width_1=20)
    # 20 epochs at width 1: 8.9 at 1.5, 5 at 2 (too few)
    assert width == 1.5 and measured == [1.5, 2.0]
    assert chosen.train_steps == round(2000 / 1.5 ** 2)
    assert lines == ["width 1.5: the widest that trains for 8 epochs or more in the budget "
                     "(8.9 epochs; width 2 would have 5.0)"]


def test_widening_stops_at_three_times_the_width(monkeypatch):
    config = build_config("inception-cpu", "cpu10", widen_for_epochs=2)
    width, _, measured, _ = widen(config, monkeypatch, epochs_at_width_1=100)
    assert width == 3.0 and measured == [1.5, 2.0, 2.5, 3.0]


@pytest.mark.parametrize("settings, epochs", [
    (dict(widen_for_epochs=30), 20),                          # width 1 is already short of it
    (dict(widen_for_epochs=8, model_options={"width": 1.25}), 20),  # the caller's width
    (dict(widen_for_epochs=None), 20),                        # no widening asked
])
def test_no_widening(monkeypatch, settings, epochs):
    config = build_config("inception-cpu", "cpu10", **settings)
    width, chosen, measured, _ = widen(config, monkeypatch, epochs)
    assert measured == [] and chosen.train_steps == round(
        100 * epochs / config.model_options.get("width", 1.0) ** 2)


def test_a_model_without_a_width_option_is_not_widened(monkeypatch):
    config = build_config("seed-naive", "cpu10", widen_for_epochs=1)
    *_, measured, lines = widen(config, monkeypatch, epochs_at_width_1=50)
    assert measured == [] and lines == []


def test_a_width_whose_measurement_spends_the_budget_is_not_taken(monkeypatch):
    config = build_config("inception-cpu", "cpu10", widen_for_epochs=8)
    fake_plans(monkeypatch, 20)
    faked = budgeting.plan_budget

    def spent_at_width_2(loop, test_images, started):
        if loop.model_options.get("width") == 2.0:
            raise BudgetError("spent")
        return faked(loop, test_images, started)

    monkeypatch.setattr(budgeting, "plan_budget", spent_at_width_2)
    lines = []
    loop = FakeLoop(config)
    loop, _, _ = widen_for_budget(loop, faked(loop, 0, 0.0), loop.build, 0, 0.0, lines.append)
    assert loop.model_options["width"] == 1.5 and "spent" in lines[0]


def test_every_rank_plans_from_the_slowest_rank_s_rates(monkeypatch):
    """The ranks of a split run must plan the same steps and epochs: every rate a plan uses,
    the per-epoch cost of saving too, is taken over the ranks (the slowest rank's)."""
    mine = Rates(step_s=0.1, val_image_s=1e-4, test_image_s=1e-4, epoch_s=0.3)
    theirs = Rates(step_s=0.1, val_image_s=1e-4, test_image_s=1e-4, epoch_s=3.0)
    monkeypatch.setattr(budgeting, "measure_rates", lambda loop: mine)

    def all_reduce(tensor, ctx, op="sum"):  # a max with the other rank's values
        assert op == "max"
        timed = [f.name for f in dataclasses.fields(Rates) if f.name != "busy"]  # the times
        other = torch.tensor([*(getattr(theirs, name) for name in timed), 0.0],
                             dtype=tensor.dtype)
        return torch.maximum(tensor, other)

    monkeypatch.setattr(budgeting.distributed, "all_reduce", all_reduce)
    loop = SimpleNamespace(config=build_config("inception-cpu", "cpu10", budget=60.0),
                           device=torch.device("cpu"), ctx=SimpleNamespace(world_size=2),
                           prepared=SimpleNamespace(val_x=torch.empty(100, 1)),
                           steps_per_epoch=20)
    assert budgeting.plan_budget(loop, 0, time.perf_counter()).rates == theirs


def test_the_probe_and_the_loop_take_the_one_training_step(tmp_path, monkeypatch):
    """The budget's probe measures the step the loop takes: both go through train_step (the
    probe on a copy of the model), so per-step work added there is measured as well."""
    import cifar_inception.training.loop as loop_mod
    import cifar_inception.training.step as step_mod
    from cifar_inception import distributed

    assert loop_mod.train_step is budgeting.train_step is step_mod.train_step
    stepped = []
    real_optimise = step_mod.optimise
    monkeypatch.setattr(step_mod, "optimise",
                        lambda net, *args, **kwargs: stepped.append(net)
                        or real_optimise(net, *args, **kwargs))
    config = build_config(TINY, "default", epochs=1, batch_size=32, val_size=32,
                          out_dir=str(tmp_path / "runs"), name="run", test=False,
                          num_threads=1)
    run = loop_mod.prepare(config, easy_data(n_train=128, n_test=16), None,
                           distributed.context_from_environment(), torch.device("cpu"),
                           lambda _: None)
    # prepare() settles precision as train() does (bf16 on a CPU only where native)
    assert run.loop.bf16 == cpu_precision(None).bf16
    budgeting.measure_rates(run.loop)
    probed = len(stepped)
    loop_mod.run_epochs(run)
    assert probed > 0 and len(stepped) - probed == run.loop.total_steps
    assert run.loop.net not in stepped[:probed]  # the probe steps a copy of the model
    assert all(net is run.loop.net for net in stepped[probed:])
