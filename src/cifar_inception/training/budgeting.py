"""Fitting a run to a time budget (``--budget``): measure this machine's speed (and, where it
looks busy, which thread count suits it), plan the steps, and keep the plan current while
the run trains (:class:`FollowBudget`)."""

from __future__ import annotations

import copy
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from cifar_inception import distributed
from cifar_inception.budget import (
    EPOCH_FIXED_S,
    RANK_PROBE_STEPS,
    TARGET,
    TTA_SHARE,
    Pace,
    Plan,
    Rates,
    affordable_views,
    choose_threads,
    fewer_threads,
    fit_steps,
    plan,
    read_windows,
    replan_total,
    time_per_call,
    time_windows,
)
from cifar_inception.checkpoint import save_checkpoint
from cifar_inception.devices import usable_cores
from cifar_inception.evaluation import (
    TTA_VIEW_COUNTS,
    log_probabilities,
    test_in_channels_last,
)
from cifar_inception.runs import BEST, LAST
from cifar_inception.training.optim import Lookahead, build_optimizer
from cifar_inception.training.record import record_plan
from cifar_inception.training.setup import (
    Loop,
    autocast_for,
    seeded_generator,
    uses_channels_last,
)
from cifar_inception.training.step import train_step


def plan_budget(loop: Loop, test_images: int, started: float) -> Plan:
    """Measure this machine's speed on a scratch copy of the model, then plan the run."""
    return plan_from_rates(loop, measure_rates(loop), test_images, started)


def plan_from_rates(loop: Loop, rates: Rates, test_images: int, started: float) -> Plan:
    """The plan that ``rates`` allow in what is left of the budget."""
    # Every rank steps together: the slowest one sets the pace. Every rank must also plan
    # the same number of steps, so they all plan from the same rates (every one of them:
    # a rank's own epoch_s once made the ranks plan different epochs) and the same (the
    # latest) elapsed time.
    *slowest, elapsed = distributed.all_reduce(torch.tensor(
        [rates.step_s, rates.val_image_s, rates.test_image_s, rates.epoch_s,
         time.perf_counter() - started],
        dtype=torch.float64, device=loop.device), loop.ctx, op="max").tolist()
    budget, rates = loop.config.budget, Rates(*slowest, busy=rates.busy)
    wanted = tuple(v for v in TTA_VIEW_COUNTS if v <= loop.config.tta_views)
    views = affordable_views(budget, test_images, rates.test_image_s, wanted) \
        if loop.config.tta else 0
    val_per_rank = math.ceil(loop.prepared.val_x.shape[0] / loop.ctx.world_size)
    return plan(budget, elapsed, rates,
                steps_per_epoch=loop.steps_per_epoch, val_images=val_per_rank,
                test_images=test_images * max(1, views), tta_views=views)


def settle_threads(loop: Loop, budget_plan: Plan, test_images: int, started: float,
                   emit: Callable[[str], None]) -> Plan:
    """Say when the probe found the machine busy; then, in a run of one process whose
    threads were not given, measure fewer threads against all of them and keep the faster
    (with another program on one core, threads that wait on each other at every parallel
    region can run several times slower than one thread alone)."""
    rates = budget_plan.rates
    if not rates.busy:
        return budget_plan
    emit(f"this machine looks busy: {rates.busy}")
    current = torch.get_num_threads()
    if loop.ctx.enabled or loop.config.num_threads or not fewer_threads(current):
        return budget_plan
    measured = {current: rates}
    for threads in fewer_threads(current):
        torch.set_num_threads(threads)
        measured[threads] = measure_rates(loop)
    chosen, why = choose_threads({t: r.step_s for t, r in measured.items()}, current)
    torch.set_num_threads(chosen)
    emit(f"threads: {why}")
    return plan_from_rates(loop, measured[chosen], test_images, started)


def measure_rates(loop: Loop) -> Rates:
    """Seconds per training step and per validation and test image, measured on a copy of
    the model (its optimiser and lookahead too), so that the run itself is untouched."""
    config, device, data = loop.config, loop.device, loop.prepared
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state(device) if loop.cuda else None)
    model = copy.deepcopy(loop.model)
    net = distributed.wrap(model, loop.ctx, device)
    optimizer = build_optimizer(config, model)
    lookahead = (Lookahead(model, config.lookahead_steps, config.lookahead_decay)
                 if config.lookahead else None)
    probe = replace(loop, model=model, net=net, optimizer=optimizer, lookahead=lookahead)
    images, labels = data.train_x[:config.batch_size], data.train_y[:config.batch_size]
    calls = 0

    def step() -> None:
        nonlocal calls
        train_step(probe, images, labels, lr=config.lr,
                   generator=seeded_generator(device, "probe"))
        calls += 1
        if lookahead is not None:
            lookahead.after_step(calls, 1 << 30)
        _sync(device)

    # Each step of a run split into ranks all-reduces its gradients, so every rank must take
    # the same number of probe steps: counted, not timed (a timed count differs by rank, and
    # the ranks would fall out of step).
    windows = time_windows(step, windows=RANK_PROBE_STEPS, calls_per_window=1) \
        if loop.ctx.enabled else time_windows(step)
    reading = read_windows(*windows, threads=torch.get_num_threads())
    model.eval()
    sample = data.val_x[:config.eval_batch_size]
    if sample.shape[0] == 0:
        sample = data.train_x[:config.eval_batch_size]

    def evaluate_sample(bf16: bool, in_channels_last: bool) -> Callable[[], None]:
        net = model.to(memory_format=torch.channels_last if in_channels_last
                       else torch.contiguous_format)

        def run() -> None:
            with autocast_for(bf16 and loop.bf16, device):
                log_probabilities(net, sample, data.mean, data.std,
                                  batch_size=config.eval_batch_size, device=device,
                                  channels_last=in_channels_last)
        return run

    per_image = 1.0 / sample.shape[0]
    val_s = time_per_call(evaluate_sample(True, uses_channels_last(config, device)), min_seconds=0.5,
                          min_calls=1) * per_image
    # The final test evaluates best.pt as evaluate() does: fp32, in its layout.
    test_s = time_per_call(evaluate_sample(False, test_in_channels_last(device)),
                           min_seconds=0.5, min_calls=1) * per_image

    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".budget-probe-", dir=out_dir) as scratch:
        def write_checkpoints() -> None:  # best.pt and last.pt, as an epoch's end writes them
            save_checkpoint(Path(scratch) / BEST, {"model": model.state_dict()})
            save_checkpoint(Path(scratch) / LAST, {"model": model.state_dict(),
                                                   "optimizer": optimizer.state_dict()})

        epoch_s = time_per_call(write_checkpoints, min_seconds=0.2, min_calls=1)
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state(rng[1], device)
    return Rates(reading.seconds, val_s, test_s, epoch_s + EPOCH_FIXED_S, busy=reading.busy)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The width rests on the probe's short look at the machine: a program that starts or ends
# during it misreads the machine. The run's own first steps check it before it is kept.
WIDTH_CHECK_STEPS = 20  # timed steps of the run itself that the check reads
WIDTH_MISREAD = 0.15    # a real rate this far from the probe's (either way) has it choose again


class WidthCheck:
    """The width a budget chose, checked against the run's first steps.

    The widths tried were measured one after the other by the probe. Once
    :data:`WIDTH_CHECK_STEPS` steps of the run itself are timed (half the first epoch where
    that is shorter), their rate against the
    probe's for the chosen width rescales every width's measured rates alike (what misread
    the machine misread it for all of them), and the widest width that still buys the
    epochs wanted is chosen again; where that is another width, the run starts over at it
    (those few steps are lost; no checkpoint exists yet). Only widths the probe measured are
    chosen from: a width never timed is not guessed at."""

    def __init__(self, chosen: float, tried: dict[float, Rates], wanted: float,
                 steps_per_epoch: int):
        self.chosen, self.tried, self.wanted = chosen, dict(tried), wanted
        # timed steps to read before judging: inside the first epoch, however short it is
        self.needed = min(WIDTH_CHECK_STEPS, max(1, steps_per_epoch // 2))
        self.steps, self.seconds = 0, 0.0

    def observe(self, steps: int, seconds: float) -> float | None:
        """Add timed steps of the run; once there are enough, the ratio of their time per
        step to the probe's (else None)."""
        self.steps, self.seconds = self.steps + steps, self.seconds + seconds
        if self.steps < self.needed:
            return None
        return self.seconds / self.steps / self.tried[self.chosen].step_s

    def rates_at(self, width: float, ratio: float) -> Rates:
        """A width's measured rates, rescaled as the run's first steps found the machine."""
        rates = self.tried[width]
        return replace(rates, step_s=rates.step_s * ratio,
                       val_image_s=rates.val_image_s * ratio,
                       test_image_s=rates.test_image_s * ratio)

    def choose(self, ratio: float, epochs_at: Callable[[Rates], float]) -> float:
        """The width to train at, given the ratio that :meth:`observe` found and the epochs
        that a width's (rescaled) rates buy from now."""
        if abs(math.log(ratio)) < math.log1p(WIDTH_MISREAD):
            return self.chosen
        fitting = [width for width in sorted(self.tried)
                   if epochs_at(self.rates_at(width, ratio)) >= self.wanted]
        return max(fitting, default=min(self.tried))


# Mid-run, the thread count is measured again when the smoothed rate falls below this share
# of the rate it was chosen at (another program started), and, while the run is on fewer
# threads than cores, every THREADS_RECHECK_S (the other program may have ended; twice as
# long after each trial that kept the count, so a hog that stays costs little).
RATE_DROP = 0.5
THREADS_RECHECK_S = 60.0
THREADS_TRIAL_STEPS = 5  # steps timed at the other count, after one untimed
TRIAL_GIVE_UP = 2.0      # a trial count this many times slower is given up after one step
THREADS_RECHECK_MOST_S = 480.0  # the recheck interval doubles, to this, while nothing changes
REPLAN_SHARE = 0.01      # a change of plan under this share of the steps left is left alone


class FollowBudget:
    """Keeps a budgeted run's plan current while it trains.

    After each step (:meth:`after_step`, with the elapsed time every rank agreed on) the
    smoothed rate (:class:`~cifar_inception.budget.Pace`) and what is left of the budget
    give the steps that still fit, their validations and the final test reserved
    (:func:`~cifar_inception.budget.fit_steps`): the deadline. The plan follows when that
    moves by over :data:`REPLAN_SHARE` of the steps left (or by one step, to end in time);
    only the part left is stretched or shrunk. After each epoch (:meth:`after_epoch`) the
    measured validation time replaces the probe's. In a run of one process without
    ``--threads``, a sharp drop of the rate has fewer (or all) threads tried on real steps.
    """

    def __init__(self, loop: Loop, budget_plan: Plan, run_started: float, test_images: int,
                 emit: Callable[[str], None], width_check: WidthCheck | None = None):
        rates, config = budget_plan.rates, loop.config
        self.budget_s, self.run_started, self.emit = config.budget, run_started, emit
        self.test_images = test_images
        self.width_check = width_check
        # Set when the first steps chose another width: the run starts over at it, with
        # these rates (the probe's for that width, rescaled as the steps found the machine).
        self.restart_at: tuple[float, Rates] | None = None
        self.steps_per_epoch = loop.steps_per_epoch
        self.val_images = math.ceil(loop.prepared.val_x.shape[0] / loop.ctx.world_size)
        self.test_s = test_images * max(1, budget_plan.tta_views) * rates.test_image_s
        self.save_s = rates.epoch_s
        self.epoch_cost_s = self.val_images * rates.val_image_s + rates.epoch_s
        self.pace = Pace(rates.step_s)
        self.probe_step_s = rates.step_s  # what the test's reserve was measured beside
        self.since: tuple[int, float] | None = None  # (step, elapsed) of the last reading
        self.cold = 2  # the first steps after the probe, or a change of threads: not timed
        self.announced = budget_plan.train_steps
        self.threads = None if loop.ctx.enabled or config.num_threads else ThreadWatch(
            torch.get_num_threads(), rates.step_s)

    def start_epoch(self) -> None:
        """The time between epochs (validation, saving) is no step's."""
        self.since = None

    def after_step(self, loop: Loop, done: int, epoch: int, elapsed: float) -> None:
        """``done`` global steps are taken, ``elapsed`` seconds after the run's start."""
        if self.since is not None and self.cold == 0:
            steps, seconds = done - self.since[0], elapsed - self.since[1]
            watching = self.threads is None or not self.threads.trying
            if watching:
                self.pace.observe(steps, seconds)
                if self.width_check is not None:
                    self._check_width(loop, steps, seconds)
            if self.threads is not None:
                self._follow_threads(steps, seconds, elapsed)
        self.cold = max(0, self.cold - 1)
        self.since = (done, elapsed)
        # At a whole epoch's last step its validation is still owed, which the count of
        # fit_steps (from the next epoch on) would leave out: the epoch's end plans then.
        if done % loop.steps_per_epoch:
            self._adopt(loop, done, epoch, epoch + 1, self._fitting(elapsed, done, 0.0))

    def after_epoch(self, loop: Loop, epochs_done: int, validation_s: float) -> None:
        """Plan again after an epoch's validation (its checkpoints still to be written), and
        record the plan in the run's config.json."""
        self.width_check = None  # an epoch is done (and saved): the width is kept
        elapsed, validation_s = distributed.all_reduce(torch.tensor(
            [time.perf_counter() - self.run_started, validation_s], dtype=torch.float64,
            device=loop.device), loop.ctx, op="max").tolist()  # the same on every rank
        self.epoch_cost_s = validation_s + self.save_s
        done = min(loop.total_steps, epochs_done * loop.steps_per_epoch)
        self._adopt(loop, done, epochs_done, epochs_done,
                    self._fitting(elapsed, done, self.save_s))
        total = loop.total_steps
        if abs(total - self.announced) > REPLAN_SHARE * self.announced:
            self.announced = total
            self.emit(f"budget re-planned after epoch {epochs_done} (measured "
                      f"{loop.config.batch_size / self.pace.step_s:,.0f} training images/s): "
                      f"{total / loop.steps_per_epoch:.2f} epochs, {total} steps in all")
        record_plan(loop, self.emit)

    def test_s_now(self) -> float:
        """The final test's reserve at the machine's present speed: the probe measured it
        beside its training steps, and a machine whose steps now take longer (another
        program, fewer threads) takes as much longer to test. Never less than measured."""
        return self.test_s * max(1.0, self.pace.step_s / self.probe_step_s)

    def _check_width(self, loop: Loop, steps: int, seconds: float) -> None:
        check = self.width_check
        ratio = check.observe(steps, seconds)
        if ratio is None:
            return
        self.width_check = None

        def epochs_at(rates: Rates) -> float:
            bought = plan_from_rates(loop, rates, self.test_images, self.run_started)
            return bought.train_steps / loop.steps_per_epoch

        width = check.choose(ratio, epochs_at)
        if width == check.chosen:
            return
        self.restart_at = width, check.rates_at(width, ratio)
        self.emit(f"width {width:g}: the run's first {check.steps} steps took {ratio:.2f}x "
                  f"the time per step that the probe measured, so width {check.chosen:g} "
                  f"was a misreading; starting over at width {width:g}")

    def _fitting(self, elapsed: float, done: int, owed_s: float) -> int:
        seconds = self.budget_s * TARGET - elapsed - self.test_s_now() - owed_s
        return fit_steps(seconds, self.pace.step_s, self.epoch_cost_s, done=done,
                         steps_per_epoch=self.steps_per_epoch)

    def _adopt(self, loop: Loop, done: int, epoch: int, begun: int, wanted: int) -> None:
        """Follow ``wanted`` total steps from global step ``done`` in epoch ``epoch``
        (``begun`` epochs begun) when it differs enough; a shrink needs less than a growth,
        so that an estimate that wavers by a step does not move the plan back and forth."""
        total = replan_total(wanted, done, epoch, loop.steps_per_epoch)
        left = max(1, loop.total_steps - done)
        shrink = loop.total_steps - total >= max(1.0, REPLAN_SHARE * left)
        grow = total - loop.total_steps >= max(2.0, 2 * REPLAN_SHARE * left)
        if shrink or grow:
            loop.set_plan(loop.run_plan().replanned(done, total, begun))

    def _follow_threads(self, steps: int, seconds: float, elapsed: float) -> None:
        watch = self.threads
        change = watch.observe(self.pace.step_s, steps, seconds, elapsed)
        if change is None:
            return
        threads, why = change
        torch.set_num_threads(threads)
        self.cold = 1  # the first step at a new count sets up its threads
        if why:
            self.pace = Pace(watch.reference_s)
            self.emit(f"threads: {why}")


class ThreadWatch:
    """When to try another thread count on real steps, and which to keep (pure: it is told
    the rate, the steps and the time, and answers the thread count to set)."""

    def __init__(self, threads: int, step_s: float, cores: int | None = None):
        # Every core this process may use, not the count it starts on: a run that began
        # on fewer (a busy probe) must still try all of them once the other program ends.
        self.cores = cores or usable_cores()
        self.threads, self.reference_s = threads, step_s
        self.chosen_at: float | None = None  # elapsed seconds when the count was chosen
        self.trying: int | None = None       # the count on trial
        self.before_s = 0.0                  # the smoothed rate before the trial
        self.trial: list[tuple[int, float]] = []
        self.recheck_s = THREADS_RECHECK_S   # doubled after each trial that changed nothing

    def observe(self, pace_s: float, steps: int, seconds: float, elapsed: float
                ) -> tuple[int, str] | None:
        """(threads to set, and why: '' when a trial starts) or None (nothing to change)."""
        if self.chosen_at is None:
            self.chosen_at = elapsed
        if self.trying is not None:
            self.trial.append((steps, seconds))
            trial_s = sum(t for _, t in self.trial) / sum(n for n, _ in self.trial)
            # A count that is already far slower needs no more steps to tell (beside a hog,
            # every step on all the cores can cost several of the others).
            hopeless = trial_s > TRIAL_GIVE_UP * self.before_s
            if sum(n for n, _ in self.trial) < THREADS_TRIAL_STEPS and not hopeless:
                return None
            measured = {self.threads: self.before_s, self.trying: trial_s}
            chosen, why = choose_threads(measured, self.threads)
            self.recheck_s = THREADS_RECHECK_S if chosen != self.threads \
                else min(2 * self.recheck_s, THREADS_RECHECK_MOST_S)
            self.reference_s = measured[chosen]
            self.threads, self.trying, self.trial = chosen, None, []
            self.chosen_at = elapsed
            return chosen, why
        other = self._other()
        dropped = pace_s * RATE_DROP > self.reference_s
        stale = self.threads < self.cores and elapsed - self.chosen_at >= self.recheck_s
        if other is None or not (dropped or stale):
            return None
        self.trying, self.before_s, self.trial = other, pace_s, []
        return other, ""

    def _other(self) -> int | None:
        if self.threads < self.cores:
            return self.cores
        fewer = fewer_threads(self.cores)
        return fewer[0] if fewer else None


def fewer_views_line(asked: int, kept: int) -> str:
    if kept:
        return (f"test-time augmentation with {kept} views (the image and its mirror): "
                f"{asked} views of the test set would take over {TTA_SHARE:.0%} of the budget "
                "on this machine")
    return (f"test-time augmentation off: even its fewest views of the test set would take "
            f"over {TTA_SHARE:.0%} of the budget on this machine")
