"""A budget followed while the run trains, with a fake clock: the deadline holds when the
machine slows, the schedules stay well shaped, no epoch is a sliver, the thread count follows
what is measured, and a resumed run continues the recorded plan. No real time is asserted."""

from __future__ import annotations

import json
import time

import pytest
import torch
from synthetic_data import TINY, easy_data

import cifar_inception.training.budgeting as budgeting
import cifar_inception.training.loop as loop_mod
from cifar_inception.budget import (
    FOLD_SHARE,
    Plan,
    Rates,
    RunPlan,
    choose_threads,
    epochs_for,
    fewer_threads,
    fit_steps,
    read_windows,
    replan_total,
    steps_in_epoch,
)
from cifar_inception.checkpoint import load_checkpoint
from cifar_inception.recipes import build_config
from cifar_inception.training import resume_config, train
from cifar_inception.training.budgeting import (
    WIDTH_CHECK_STEPS,
    ThreadWatch,
    WidthCheck,
    settle_threads,
)
from cifar_inception.training.optim import lr_at_progress, lr_factor

BUDGET = 60.0
STEPS_PER_EPOCH = 500 // 32  # 600 images, 100 held out, batches of 32
IMAGE_S = 0.004  # the fake machine's seconds to evaluate an image


# --------------------------------------------------------------------------- pure pieces


def test_planning_is_closed_form_for_any_budget():
    # a week of steps of a nanosecond: answered at once, not one loop per epoch
    assert fit_steps(7 * 24 * 3600.0, 1e-9, 0.0, done=0, steps_per_epoch=10) > 10 ** 14
    # with half a second for each epoch's end: 1.2 million epochs, not a loop over them
    assert fit_steps(7 * 24 * 3600.0, 1e-9, 0.5, done=0, steps_per_epoch=10) == 12095990
    assert fit_steps(0.5, 0.1, 1.0, done=7, steps_per_epoch=10) == 7  # nothing more fits


def test_fit_steps_counts_the_validation_of_every_epoch_begun():
    # 3 s a step, 1 s an epoch's end; at step 4 of 10, 30 s: 6 steps to the end of the
    # epoch (18 s) and its validation (1 s) leave 11 s: 3 steps of the next and its validation
    assert fit_steps(30.0, 3.0, 1.0, done=4, steps_per_epoch=10) == 13
    assert fit_steps(10.0, 3.0, 1.0, done=4, steps_per_epoch=10) == 7  # the epoch cut short


@pytest.mark.parametrize("total, epochs, last", [
    (152, 8, 12),   # 12 of 20: kept as its own epoch
    (141, 7, 21),   # a sliver of 1 step is folded into the 7th epoch
    (149, 7, 29),   # 9 of 20, under half: folded
    (140, 7, 20),
    (7, 1, 7),      # a run shorter than an epoch is one short epoch
])
def test_no_epoch_is_a_sliver(total, epochs, last):
    assert epochs_for(total, 20) == epochs
    assert [steps_in_epoch(e, total, 20) for e in range(epochs + 1)] == \
        [20] * (epochs - 1) + [last, 0]
    assert all(steps_in_epoch(e, total, 20) >= min(total, FOLD_SHARE * 20)
               for e in range(epochs))


def test_a_replan_inside_a_folded_epoch_keeps_it_the_last():
    # at step 145 of epoch 6 (its 25th step), a longer plan cannot end epoch 6 back at 140
    assert replan_total(300, 145, 6, 20) == 149
    assert replan_total(100, 145, 6, 20) == 145  # nor end before the step already taken


def test_progress_only_moves_forward_and_a_replan_stretches_what_is_left():
    plan = RunPlan(100, warmup=0.2)
    assert [plan.at(s) for s in (0, 50, 100)] == [0.0, 0.5, 1.0]
    longer = plan.replanned(50, 300, begun_epochs=3)
    shorter = longer.replanned(120, 150, begun_epochs=5)
    assert longer.at(50) == plan.at(50) and longer.at(300) == 1.0
    assert shorter.at(120) == pytest.approx(longer.at(120)) and shorter.at(150) == 1.0
    progress = [shorter.at(s) for s in range(151)]
    assert progress == sorted(progress)
    assert RunPlan.from_dict(shorter.to_dict()) == shorter


def test_a_plan_cut_inside_an_epoch_keeps_that_epoch_as_a_short_last_one():
    plan = RunPlan(200, 0.1).replanned(42, 42, begun_epochs=3)  # the deadline, at step 42
    assert plan.epochs(20) == 3 and plan.steps_in(2, 20) == 2


def test_lr_by_progress_is_lr_by_steps_on_a_plan_that_never_changed():
    for step in range(0, 101, 7):
        assert lr_at_progress(step / 100, 0.1, "onecycle", 0.07) == pytest.approx(
            lr_factor(step, 100, 10, "onecycle", 0.07))


def test_the_probe_reads_the_median_window_and_says_when_the_machine_looks_busy():
    idle = read_windows([0.10, 0.11, 0.10, 0.105, 0.10], cpu_s=1.9, wall_s=1.0, threads=2)
    assert idle.seconds == pytest.approx(0.10) and idle.busy == ""
    slowed = read_windows([0.10, 0.11, 0.90, 0.105, 0.10], cpu_s=1.9, wall_s=1.0, threads=2)
    assert slowed.seconds == pytest.approx(0.105)  # one window slowed: the reading is not
    assert "5 timing windows differed" in slowed.busy
    starved = read_windows([0.4] * 5, cpu_s=0.5, wall_s=1.0, threads=2)
    assert "the process got 25% of the CPU time of its 2 threads" in starved.busy


# --------------------------------------------------------------------------- threads


def test_the_thread_choice_follows_the_measurements():
    assert fewer_threads(2) == [1] and fewer_threads(8) == [4, 1] and fewer_threads(1) == []
    assert choose_threads({2: 0.95, 1: 0.2}, 2) == (1, "1 thread (a step took 0.95 s with 2, "
                                                      "0.2 s with 1)")
    assert choose_threads({2: 0.50, 1: 0.48}, 2)[0] == 2  # a few per cent: all cores stay
    assert choose_threads({8: 0.30, 4: 0.20, 1: 0.25}, 8)[0] == 4


def test_a_busy_probe_measures_fewer_threads_and_keeps_the_faster(monkeypatch):
    step_s = {2: 0.9, 1: 0.15}  # faked: two threads that wait on each other behind a hog
    monkeypatch.setattr(budgeting, "measure_rates", lambda loop: Rates(
        step_s[torch.get_num_threads()], 1e-4, 1e-4, busy="its windows differed"))
    monkeypatch.setattr(budgeting, "plan_from_rates",
                        lambda loop, rates, *_: Plan(100, 1, 10.0, rates))
    loop = type("FakeLoop", (), {"ctx": type("Ctx", (), {"enabled": False})(),
                                 "config": build_config(None, "cpu10")})()
    threads, lines = torch.get_num_threads(), []
    torch.set_num_threads(2)
    try:
        first = Plan(10, 1, 10.0, budgeting.measure_rates(loop))
        chosen = settle_threads(loop, first, 0, 0.0, lines.append)
        assert torch.get_num_threads() == 1 and chosen.rates.step_s == 0.15
    finally:
        torch.set_num_threads(threads)
    assert lines == ["this machine looks busy: its windows differed",
                     "threads: 1 thread (a step took 0.9 s with 2, 0.15 s with 1)"]


def test_a_sharp_drop_mid_run_tries_the_other_thread_count_on_real_steps():
    watch = ThreadWatch(2, step_s=0.1, cores=2)
    assert watch.observe(0.12, 1, 0.12, elapsed=5.0) is None        # no sharp drop
    assert watch.observe(0.35, 1, 0.9, elapsed=6.0) == (1, "")      # a hog: try 1 thread
    for second in range(4):
        assert watch.observe(0.35, 1, 0.15, elapsed=7.0 + second) is None
    threads, why = watch.observe(0.35, 1, 0.15, elapsed=11.0)
    assert threads == 1 and why.startswith("1 thread (a step took 0.35 s with 2, 0.15 s")
    # on fewer threads than cores, all of them are tried again after a while
    assert watch.observe(0.15, 1, 0.15, elapsed=30.0) is None
    assert watch.observe(0.15, 1, 0.15, elapsed=72.0) == (2, "")
    for second in range(4):
        watch.observe(0.15, 1, 0.08, elapsed=73.0 + second)
    assert watch.observe(0.15, 1, 0.08, elapsed=78.0)[0] == 2      # the hog ended


def test_a_run_that_starts_on_fewer_threads_tries_every_core_later(monkeypatch):
    """A probe beside a hog chose one thread; the watch, made after that choice, still
    knows the cores, and tries them all once the other program may have ended."""
    monkeypatch.setattr(budgeting, "usable_cores", lambda: 2)
    watch = ThreadWatch(1, step_s=0.15)
    assert watch.observe(0.15, 1, 0.15, elapsed=5.0) is None
    assert watch.observe(0.15, 1, 0.15, elapsed=70.0) == (2, "")
    for second in range(4):
        watch.observe(0.15, 1, 0.08, elapsed=71.0 + second)
    threads, why = watch.observe(0.15, 1, 0.08, elapsed=76.0)
    assert threads == 2 and why.startswith("2 threads")


def test_a_hopeless_trial_ends_after_one_step_and_the_next_waits_twice_as_long(monkeypatch):
    """Beside a hog that stays, all the cores are several times slower than one thread: the
    trial gives up after one timed step, and each trial that keeps the count doubles the
    wait before the next (so a hog for the whole run costs a few steps, not a share)."""
    monkeypatch.setattr(budgeting, "usable_cores", lambda: 2)
    watch = ThreadWatch(1, step_s=0.6)
    watch.observe(0.6, 1, 0.6, elapsed=0.0)
    trials = []
    for second in range(1, 1000):
        change = watch.observe(0.6, 1, 0.6, elapsed=float(second))
        if change == (2, ""):
            trials.append(second)
            kept = watch.observe(0.6, 1, 2.7, elapsed=second + 0.5)  # one step at 2 threads
            assert kept is not None and kept[0] == 1, kept
    assert trials[:4] == [60, 181, 422, 903]


# --------------------------------------------------------------------------- runs, faked time


class Machine:
    """A fake clock for a whole run: each training step, validation and test advances it by
    what the machine would take (``step_s(now)``); every reading advances it a little, so
    that whatever waits for time ends."""

    def __init__(self, step_s, monkeypatch, *, width_cost=lambda width: 1.0,
                 probe_factor: float = 1.0, slows_evaluation: bool = False):
        self.now, self.step_s = 1000.0, step_s
        self.lrs: list[float] = []
        self.widths: list[float] = []  # the model width of each training step
        self.epoch_steps: list[int] = []
        self.steps_since_validation = 0
        real_step, real_validate, real_evaluate, real_log_probabilities = (
            loop_mod.train_step, loop_mod.validation_metrics, loop_mod.evaluate,
            budgeting.log_probabilities)

        def width_of(loop) -> float:
            return loop.plan.model_options.get("width", 1.0)

        def timed_step(factor, loop, *args, **kwargs):
            self.now += self.step_s(self.now - self.started) * width_cost(width_of(loop)) \
                * factor
            return real_step(loop, *args, **kwargs)

        def probe_step(*args, **kwargs):  # ``probe_factor``: the probe misreads the machine
            return timed_step(probe_factor, *args, **kwargs)

        def training_step(loop, *args, **kwargs):
            self.lrs.append(kwargs["lr"])
            self.widths.append(width_of(loop))
            self.steps_since_validation += 1
            return timed_step(1.0, loop, *args, **kwargs)

        def image_s() -> float:  # ``slows_evaluation``: evaluation slows as the steps do
            if not slows_evaluation:
                return IMAGE_S
            return IMAGE_S * self.step_s(self.now - self.started) / self.step_s(0.0)

        def validate(model, prepared, *args, **kwargs):
            self.now += image_s() * prepared.val_x.shape[0]
            self.epoch_steps.append(self.steps_since_validation)
            self.steps_since_validation = 0
            return real_validate(model, prepared, *args, **kwargs)

        def evaluate(checkpoint, data, *args, **kwargs):
            self.now += image_s() * len(data.test_labels)
            return real_evaluate(checkpoint, data, *args, **kwargs)

        def probe_evaluation(net, images, *args, **kwargs):
            self.now += IMAGE_S * images.shape[0] * probe_factor
            return real_log_probabilities(net, images, *args, **kwargs)

        monkeypatch.setattr(loop_mod, "train_step", training_step)
        monkeypatch.setattr(budgeting, "train_step", probe_step)
        monkeypatch.setattr(loop_mod, "validation_metrics", validate)
        monkeypatch.setattr(loop_mod, "evaluate", evaluate)
        monkeypatch.setattr(budgeting, "log_probabilities", probe_evaluation)
        monkeypatch.setattr(time, "perf_counter", self.read)
        monkeypatch.setattr(time, "process_time", self.read)  # one thread, never starved
        self.started = self.now

    def read(self) -> float:
        self.now += 1e-4
        return self.now


def budget_config(tmp_path, **overrides):
    settings = dict(budget=BUDGET, batch_size=32, lr=0.1, val_size=100, warmup_fraction=0.2,
                    final_lr=0.07, lookahead=True, lookahead_steps=4, test=True,
                    out_dir=str(tmp_path / "runs"), name="run", num_threads=1)
    settings.update(overrides)
    return build_config(TINY, "default", **settings)


@pytest.fixture(scope="module")
def data():
    return easy_data(n_train=600, n_test=50)


def assert_well_shaped(machine, config, lines):
    peak = machine.lrs.index(max(machine.lrs))
    after = machine.lrs[peak:]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:])), "the lr jumped back up"
    assert machine.lrs[-1] <= config.lr * (config.final_lr + 0.03)  # ends at its final value
    assert min(machine.epoch_steps) >= FOLD_SHARE * STEPS_PER_EPOCH, machine.epoch_steps


@pytest.mark.parametrize("speed", [
    pytest.param(lambda t: 0.2, id="steady"),
    pytest.param(lambda t: 0.2 if t < BUDGET / 2 else 0.6, id="slows-3x-halfway"),
    pytest.param(lambda t: 0.6 if t < BUDGET / 4 else 0.2, id="fast-after-a-quarter"),
])
def test_a_budget_run_ends_in_time_with_well_shaped_schedules(tmp_path, data, monkeypatch,
                                                              speed):
    machine = Machine(speed, monkeypatch)
    lines = []
    config = budget_config(tmp_path)
    result = train(config, data, log=lines.append)
    spent = machine.now - machine.started
    assert result.status == "completed" and result.test is not None
    assert BUDGET * 0.9 <= spent <= BUDGET, lines  # in fake seconds: none of the machine's
    assert_well_shaped(machine, config, lines)
    assert len(machine.lrs) == load_checkpoint(result.run_dir / "last.pt")[
        "training"]["plan"]["total_steps"]


def test_the_test_s_reserve_follows_a_machine_that_slows(tmp_path, monkeypatch):
    """Another program from halfway slows the steps and the final test alike, 3x: the
    reserve for the test grows with the steps' time, so the test still ends in time."""
    machine = Machine(lambda t: 0.2 if t < BUDGET / 2 else 0.6, monkeypatch,
                      slows_evaluation=True)
    lines = []
    result = train(budget_config(tmp_path), easy_data(n_train=600, n_test=600),
                   log=lines.append)
    spent = machine.now - machine.started
    assert result.status == "completed" and result.test is not None
    assert BUDGET * 0.9 <= spent <= BUDGET, lines


def test_a_resumed_run_follows_the_recorded_plan(tmp_path, data, monkeypatch):
    machine = Machine(lambda t: 0.2 if t < BUDGET / 3 else 0.6, monkeypatch)
    paused = train(budget_config(tmp_path, stop_after_epochs=8), data, log=lambda _: None)
    assert paused.status == "paused"
    recorded = load_checkpoint(paused.run_dir / "last.pt")["training"]
    plan = RunPlan.from_dict(recorded["plan"])
    assert len(plan.anchors) > 1  # the plan changed when the machine slowed
    before = len(machine.lrs)
    resumed = train(resume_config(paused.run_dir), data, resume=paused.run_dir,
                    log=lambda _: None)
    assert resumed.status == "completed"
    config = resume_config(paused.run_dir)
    expected = [config.lr * lr_at_progress(plan.at(step), plan.warmup, config.schedule,
                                           config.final_lr)
                for step in range(before, plan.total_steps)]
    assert machine.lrs[before:] == pytest.approx(expected, rel=1e-12)
    assert RunPlan.from_dict(load_checkpoint(resumed.run_dir / "last.pt")["training"][
        "plan"]) == plan


# --------------------------------------------------------------------------- the width check


def test_the_width_check_keeps_a_width_the_first_steps_confirm():
    check = WidthCheck(1.5, {1.0: Rates(0.1, 0, 0), 1.5: Rates(0.2, 0, 0)}, wanted=4,
                       steps_per_epoch=100)
    assert check.observe(WIDTH_CHECK_STEPS - 1, 0.2 * (WIDTH_CHECK_STEPS - 1)) is None
    ratio = check.observe(1, 0.21)  # 0.25% slower than the probe read it: no misreading
    assert ratio == pytest.approx(1.0025)
    assert check.choose(ratio, lambda rates: 0.0) == 1.5  # nothing asked of the widths


@pytest.mark.parametrize("ratio, chosen", [(1 / 3, 2.0), (1.0, 1.5), (3.0, 1.0), (9.0, 1.0)])
def test_the_width_check_chooses_again_from_the_rescaled_rates(ratio, chosen):
    """Epochs fall with the square of the width and with the time per step."""
    tried = {1.0: Rates(0.1, 1e-4, 1e-4), 1.5: Rates(0.225, 2e-4, 2e-4),
             2.0: Rates(0.4, 4e-4, 4e-4)}
    check = WidthCheck(1.5, tried, wanted=4, steps_per_epoch=100)

    def epochs_at(rates):
        return 2.0 / rates.step_s  # 20 epochs at width 1 as the probe read it

    assert check.choose(ratio, epochs_at) == chosen
    scaled = check.rates_at(2.0, ratio)
    assert (scaled.step_s, scaled.val_image_s) == pytest.approx((0.4 * ratio, 4e-4 * ratio))


def test_a_width_chosen_on_a_misreading_is_corrected_by_the_first_steps(tmp_path, data,
                                                                       monkeypatch):
    """The probe reads the machine 3x slow (another program during its windows): width 1
    is chosen and 1.5 refused. The run's first steps run 3x faster than that, at which 1.5
    buys the epochs wanted: the run starts over at width 1.5, and ends within its budget
    with a well-shaped schedule, its record saying width 1.5."""
    machine = Machine(lambda t: 0.2, monkeypatch, width_cost=lambda width: width ** 2,
                      probe_factor=3.0)
    lines = []
    config = budget_config(tmp_path, widen_for_epochs=4)
    result = train(config, data, log=lines.append)
    spent = machine.now - machine.started
    assert result.status == "completed" and result.test is not None
    assert any(line.startswith("width 1: the widest") for line in lines), lines
    assert any("starting over at width 1.5" in line for line in lines), lines
    assert BUDGET * 0.9 <= spent <= BUDGET, lines
    discarded = machine.widths.index(1.5)
    assert set(machine.widths[:discarded]) == {1.0} and set(machine.widths[discarded:]) == {1.5}
    assert STEPS_PER_EPOCH // 2 <= discarded < STEPS_PER_EPOCH  # inside the first epoch
    machine.lrs = machine.lrs[discarded:]
    assert_well_shaped(machine, config, lines)
    record = json.loads((result.run_dir / "config.json").read_text())
    saved = load_checkpoint(result.run_dir / "last.pt")["training"]["plan"]
    assert record["plan"]["model_options"]["width"] == saved["model_options"]["width"] == 1.5
    assert len(machine.lrs) == saved["total_steps"]


def test_a_width_the_first_steps_confirm_is_kept(tmp_path, data, monkeypatch):
    machine = Machine(lambda t: 0.2, monkeypatch, width_cost=lambda width: width ** 2)
    lines = []
    result = train(budget_config(tmp_path, widen_for_epochs=4), data, log=lines.append)
    assert result.status == "completed"
    assert not any("starting over" in line for line in lines), lines
    assert len(set(machine.widths)) == 1
