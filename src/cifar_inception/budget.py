"""A time budget: how many training steps fit in so many seconds on this machine.

``--budget 10m`` means: training, the validation after every epoch and the final test all end
within ten minutes of wall-clock time from the start of :func:`cifar_inception.train`. The
loop measures its own speed first (a probe: a few steps and evaluation batches on a scratch
copy of the model, so the real run starts from the same state as without a budget; its cold
steps left out and the median of several short windows taken, :func:`read_windows`), then
:func:`plan` fixes the number of steps. During the run a smoothed recent rate (:class:`Pace`)
keeps the plan current, inside the epoch too, so that the training ends in time for its last
validation and test however the speed changes (:func:`fit_steps` is the deadline).

Every schedule (warm-up, decay, lookahead, the whitening bias) is a function of the run's
*progress* (:class:`RunPlan`), 0 at its first step and 1 at its end. A change of plan keeps
the progress reached and stretches or shrinks only what is left, so the schedules stay
continuous and end at the run's real end. The plan is recorded in ``last.pt`` (and its length
in the run's config), so a resumed run continues the same schedule.

Nothing here imports torch, and every decision takes its times as arguments (only the
timers, :func:`time_windows` and :func:`time_per_call`, read a clock), so the decisions are
tested with a fake clock.
"""

from __future__ import annotations

import bisect
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from cifar_inception.errors import CifarInceptionError

TARGET = 0.985            # plan to end a little early: the probe's estimate is not exact
EPOCH_FIXED_S = 0.02      # per epoch, beyond the measured checkpoint writes: permutation, log
MIN_PROBE_S = 2.0         # measure steps for at least this long, after the cold ones
RANK_PROBE_STEPS = 4      # timed probe steps of each rank in a split run: counted, not timed
COLD_CALLS = 2            # untimed first steps: kernel creation, first-touch memory
PROBE_WINDOWS = 5         # short timing windows; their median is the reading
# The machine looks busy when the process got under this share of its threads' CPU time
# (another program held the cores), or when its windows' fastest and slowest differ by over
# WINDOWS_DISAGREE of their median. Either only prompts a closer look (fewer threads are
# measured against all of them): on an idle machine it costs seconds, never the plan.
BUSY_CPU_SHARE = 0.6
WINDOWS_DISAGREE = 0.3
# Test-time augmentation evaluates every test image in several views. It adds about a point
# of accuracy; when those views would cost more than this share of the budget, the time buys
# more as training (on a CPU a 2-minute budget would spend half of itself on six views).
TTA_SHARE = 0.08


def affordable_views(budget_s: float, test_images: int, test_image_s: float,
                     choices: tuple[int, ...]) -> int:
    """The most test-time views (from ``choices``) whose extra cost stays within TTA_SHARE of
    the budget; 0 when even the fewest would not (the test then takes one view)."""
    extra_s = [(views - 1) * test_images * test_image_s for views in choices]
    fitting = [views for views, cost in zip(choices, extra_s) if cost <= TTA_SHARE * budget_s]
    return max(fitting, default=0)


class BudgetError(CifarInceptionError):
    """The budget cannot hold even one step with its validation and test."""


@dataclass(frozen=True)
class Rates:
    """Seconds per training step, per evaluated image (validation and final test), and per
    epoch for the rest (writing best.pt and last.pt, the permutation, the log line)."""

    step_s: float
    val_image_s: float
    test_image_s: float
    epoch_s: float = 0.3
    busy: str = ""  # why the probe found the machine busy ('' when it did not)


@dataclass(frozen=True)
class Plan:
    train_steps: int
    epochs: int
    expected_s: float     # from the start of the run, measurement included
    rates: Rates
    tta_views: int = 0    # views of each test image in the final test (0: no augmentation)

    def describe(self, budget_s: float, steps_per_epoch: int, batch_size: int) -> str:
        end = time.strftime("%H:%M:%S", time.localtime(time.time() + self.expected_s))
        epochs = self.train_steps / steps_per_epoch
        return (f"budget {format_seconds(budget_s)}: {epochs:.2f} epochs fit "
                f"({self.train_steps} steps of {batch_size}; measured "
                f"{batch_size / self.rates.step_s:,.0f} training images/s); expected to end "
                f"at {end}, {format_seconds(self.expected_s)} after the start")


def format_seconds(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"


def plan(budget_s: float, elapsed_s: float, rates: Rates, *, steps_per_epoch: int,
         val_images: int, test_images: int, tta_views: int = 0) -> Plan:
    """The most steps whose training, validations and test fit in the rest of the budget.

    ``elapsed_s`` has already gone (loading, building, measuring). ``test_images`` counts
    every view evaluated (six per image with test-time augmentation). Each epoch, the last
    one cut short included, ends with a validation. In closed form: an absurd budget costs
    no more to plan than a short one.
    """
    available = budget_s * TARGET - elapsed_s - test_images * rates.test_image_s
    per_epoch = val_images * rates.val_image_s + rates.epoch_s
    best = fit_steps(available, rates.step_s, per_epoch, done=0,
                     steps_per_epoch=steps_per_epoch)
    if best < 1:
        needed = elapsed_s + rates.step_s + per_epoch + test_images * rates.test_image_s
        raise BudgetError(f"a budget of {format_seconds(budget_s)} cannot hold one training "
                          f"step with its validation and test on this machine (about "
                          f"{format_seconds(needed / TARGET)} needed); give a larger --budget")
    epochs = epochs_for(best, steps_per_epoch)
    expected = (elapsed_s + best * rates.step_s + epochs * per_epoch
                + test_images * rates.test_image_s)
    return Plan(best, epochs, expected, rates, tta_views)


SMALLEST_STEP_S = 1e-9  # a rate faster than this is a clock's glitch, not a machine's


def fit_steps(seconds: float, step_s: float, epoch_cost_s: float, *, done: int,
              steps_per_epoch: int) -> int:
    """The run's total steps (``done`` of them already taken) whose remaining steps, each
    epoch's validation and checkpoints (``epoch_cost_s``, the current epoch's included) fit
    in ``seconds``; ``done`` when not even one more step does.

    Epoch ends are counted at whole multiples of ``steps_per_epoch``: a last sliver folded
    into the epoch before (:func:`epochs_for`) only saves a validation, so this errs early.
    """
    step_s = max(step_s, SMALLEST_STEP_S)
    boundary = (done // steps_per_epoch + 1) * steps_per_epoch  # the current epoch's end
    left = seconds - epoch_cost_s  # the current epoch's validation is owed whatever happens
    if left < (boundary - done) * step_s:
        return done + max(0, math.floor(left / step_s))
    left -= (boundary - done) * step_s
    whole_epoch_s = steps_per_epoch * step_s + epoch_cost_s
    epochs = math.floor(left / whole_epoch_s)
    left -= epochs * whole_epoch_s
    partial = max(0, math.floor((left - epoch_cost_s) / step_s))
    return boundary + epochs * steps_per_epoch + min(partial, steps_per_epoch - 1)


# A last epoch shorter than this share of an epoch is folded into the one before: an epoch
# of one step (its validation and checkpoints costing more than its training) buys nothing.
FOLD_SHARE = 0.5


def epochs_for(total_steps: int, steps_per_epoch: int) -> int:
    """Epochs of a run of ``total_steps``: whole ones, and a last one of what is left, or
    (when that is under :data:`FOLD_SHARE` of an epoch) the last whole one made longer."""
    whole, rest = divmod(total_steps, steps_per_epoch)
    if rest and (whole == 0 or rest >= FOLD_SHARE * steps_per_epoch):
        return whole + 1
    return max(1, whole)


def steps_in_epoch(epoch: int, total_steps: int, steps_per_epoch: int,
                   epochs: int | None = None) -> int:
    """Steps of epoch ``epoch`` (0-based) in a run of ``total_steps`` in ``epochs`` epochs
    (default :func:`epochs_for`): all of them, but in the last epoch (shorter, or longer by a
    folded sliver); 0 after the last."""
    last = (epochs or epochs_for(total_steps, steps_per_epoch)) - 1
    if epoch < last:
        return steps_per_epoch
    return max(0, total_steps - last * steps_per_epoch) if epoch == last else 0


def longest_total_keeping(epoch: int, steps_per_epoch: int) -> int:
    """The most total steps for which ``epoch`` is still the last (its sliver folded in)."""
    return (epoch + 1) * steps_per_epoch + math.ceil(FOLD_SHARE * steps_per_epoch) - 1


@dataclass(frozen=True)
class RunPlan:
    """The run's length and the progress of its schedules, as changes of plan left them.

    ``anchors``: (step, progress) where the plan changed (the first is (0, 0)); progress
    runs linearly from the last anchor to 1 at ``total_steps``. A change keeps the progress
    reached, so the schedules, all functions of the progress, never jump back.
    ``warmup`` and ``whiten_bias``: the progress at which the warm-up, and the training of a
    whitening stem's bias, end (fixed when the run starts).
    """

    total_steps: int
    warmup: float
    whiten_bias: float | None = None
    anchors: tuple[tuple[int, float], ...] = ((0, 0.0),)
    # Epochs already begun when the plan last changed: a deadline that cuts an epoch short
    # leaves it a short last epoch (it cannot be folded into an epoch already validated).
    begun_epochs: int = 1

    def epochs(self, steps_per_epoch: int) -> int:
        return max(epochs_for(self.total_steps, steps_per_epoch), self.begun_epochs)

    def steps_in(self, epoch: int, steps_per_epoch: int) -> int:
        return steps_in_epoch(epoch, self.total_steps, steps_per_epoch,
                              self.epochs(steps_per_epoch))

    def at(self, step: int) -> float:
        """The progress at global step ``step`` (0-based): 0 at the first, 1 at the end."""
        index = bisect.bisect_right([s for s, _ in self.anchors], step) - 1
        start, reached = self.anchors[max(0, index)]
        end, goal = (self.anchors[index + 1] if index + 1 < len(self.anchors)
                     else (self.total_steps, 1.0))
        if step >= end:
            return goal
        return reached + (goal - reached) * (step - start) / (end - start)

    def replanned(self, step: int, total_steps: int, begun_epochs: int) -> RunPlan:
        """The same run from global step ``step`` on (``begun_epochs`` epochs begun), to
        end at ``total_steps`` instead."""
        total_steps = max(total_steps, step)
        kept = tuple(a for a in self.anchors if a[0] < step) + ((step, self.at(step)),)
        return replace(self, total_steps=total_steps, anchors=kept,
                       begun_epochs=max(self.begun_epochs, begun_epochs))

    def to_dict(self) -> dict:
        return {"total_steps": self.total_steps, "warmup": self.warmup,
                "whiten_bias": self.whiten_bias, "anchors": [list(a) for a in self.anchors],
                "begun_epochs": self.begun_epochs}

    @classmethod
    def from_dict(cls, values: dict) -> RunPlan:
        return cls(int(values["total_steps"]), float(values["warmup"]),
                   None if values["whiten_bias"] is None else float(values["whiten_bias"]),
                   tuple((int(s), float(p)) for s, p in values["anchors"]),
                   int(values["begun_epochs"]))


def replan_total(wanted: int, done: int, epoch: int, steps_per_epoch: int) -> int:
    """``wanted`` total steps, as far as the run can still take it at global step ``done``
    of epoch ``epoch``: no fewer than done, and, once inside a folded last epoch, no more
    than keep it the last (its first whole epoch is over; it cannot end back there)."""
    if done > (epoch + 1) * steps_per_epoch:
        wanted = min(wanted, longest_total_keeping(epoch, steps_per_epoch))
    return max(wanted, done)


class Pace:
    """A smoothed recent rate: seconds per training step, each new measurement weighted by
    how many steps it covers (half the weight after :data:`HALF_LIFE_STEPS` steps), so the
    estimate follows a machine that slows or speeds up within a few seconds."""

    HALF_LIFE_STEPS = 8.0

    def __init__(self, step_s: float):
        self.step_s = step_s

    def observe(self, steps: int, seconds: float) -> None:
        if steps <= 0 or seconds <= 0:
            return
        weight = 1.0 - 0.5 ** (steps / self.HALF_LIFE_STEPS)
        self.step_s += weight * (seconds / steps - self.step_s)


def time_per_call(call: Callable[[], object], *, min_seconds: float = MIN_PROBE_S,
                  min_calls: int = 2, max_calls: int = 50) -> float:
    """Seconds per ``call()``: one untimed call (kernels, caches), then at least
    ``min_calls`` timed ones and at least ``min_seconds`` of them."""
    call()
    started, calls = time.perf_counter(), 0
    while calls < min_calls or (time.perf_counter() - started < min_seconds
                                and calls < max_calls):
        call()
        calls += 1
    return (time.perf_counter() - started) / calls


def time_windows(call: Callable[[], object], *, windows: int = PROBE_WINDOWS,
                 min_seconds: float = MIN_PROBE_S, calls_per_window: int | None = None,
                 cold_calls: int = COLD_CALLS) -> tuple[list[float], float, float]:
    """Seconds per ``call()`` in each of ``windows`` windows, after ``cold_calls`` untimed
    ones; and the process's CPU seconds and the wall seconds of all the windows.

    A window lasts at least ``min_seconds / windows`` (and one call), or exactly
    ``calls_per_window`` calls where every process must make the same number of them."""
    for _ in range(cold_calls):
        call()
    per_call, cpu_started, wall_started = [], time.process_time(), time.perf_counter()
    for _ in range(windows):
        started, calls = time.perf_counter(), 0
        while (calls < (calls_per_window or 1) or calls_per_window is None
               and time.perf_counter() - started < min_seconds / windows):
            call()
            calls += 1
        per_call.append((time.perf_counter() - started) / calls)
    return per_call, time.process_time() - cpu_started, time.perf_counter() - wall_started


@dataclass(frozen=True)
class Reading:
    """What the probe's windows say: seconds per call (their median), and why the machine
    looked busy ('' when it did not)."""

    seconds: float
    busy: str = ""


def read_windows(per_call: list[float], cpu_s: float, wall_s: float, threads: int
                 ) -> Reading:
    """The median window's seconds per call, robust to a window that a passing load (or a
    late cold call) slowed; and whether the machine looked busy, and why."""
    middle = statistics.median(per_call)
    reasons = []
    share = cpu_s / (wall_s * threads) if wall_s > 0 else 1.0
    if share < BUSY_CPU_SHARE:
        reasons.append(f"the process got {share:.0%} of the CPU time of its {threads} "
                       f"thread{'s' if threads != 1 else ''}")
    spread = (max(per_call) - min(per_call)) / middle if middle > 0 else 0.0
    if len(per_call) > 1 and spread > WINDOWS_DISAGREE:
        reasons.append(f"its {len(per_call)} timing windows differed by {spread:.0%}")
    return Reading(middle, " and ".join(reasons))


# Another thread count is kept only when it is faster by this much: two readings of the same
# count differ by a few per cent, and every core is right on an idle machine.
THREADS_GAIN_NEEDED = 1.1


def fewer_threads(threads: int) -> list[int]:
    """The thread counts measured against ``threads`` on a busy machine: one, and half."""
    return sorted({1, threads // 2} - {threads, 0}, reverse=True)


def choose_threads(step_s: dict[int, float], current: int) -> tuple[int, str]:
    """The thread count whose measured seconds per step (``step_s``) is the lowest, kept
    only when it beats ``current`` by :data:`THREADS_GAIN_NEEDED`; and why, in words."""
    fastest = min(step_s, key=lambda threads: (step_s[threads], -threads))
    chosen = fastest if step_s[fastest] * THREADS_GAIN_NEEDED < step_s[current] else current
    measured = ", ".join(f"{seconds:.3g} s with {threads}" for threads, seconds in
                         sorted(step_s.items(), reverse=True))
    return chosen, f"{chosen} thread{'s' if chosen != 1 else ''} (a step took {measured})"
