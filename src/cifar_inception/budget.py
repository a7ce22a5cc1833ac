"""A time budget: how many training steps fit in so many seconds on this machine.

``--budget 10m`` means: training, the validation after every epoch and the final test all end
within ten minutes of wall-clock time from the start of :func:`cifar_inception.train`. The
loop measures its own speed first (:func:`measure`: a few steps and evaluation batches on a
scratch copy of the model, so the real run starts from the same state as without a budget),
then :func:`plan` fixes the number of steps. The schedules (warm-up, decay, lookahead, the
whitening bias) are fractions of the run, so a short and a long run are both well shaped.
The plan is recorded in the run's config (``train_steps``), so a resumed run keeps it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from cifar_inception.errors import CifarInceptionError

TARGET = 0.985            # plan to end a little early: the probe's estimate is not exact
EPOCH_FIXED_S = 0.02      # per epoch, beyond the measured checkpoint writes: permutation, log
MIN_PROBE_S = 2.0         # measure steps for at least this long, after one untimed step
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
    one cut short included, ends with a validation.
    """
    available = budget_s * TARGET - elapsed_s - test_images * rates.test_image_s
    per_epoch = val_images * rates.val_image_s + rates.epoch_s
    most = max(1, math.floor(available / rates.step_s))  # were validation free
    best = 0
    for epochs in range(1, math.ceil(most / steps_per_epoch) + 1):
        fits = math.floor((available - epochs * per_epoch) / rates.step_s)
        steps = min(fits, epochs * steps_per_epoch)
        if steps > (epochs - 1) * steps_per_epoch:  # this many epochs is possible
            best = max(best, steps)
    if best < 1:
        needed = elapsed_s + rates.step_s + per_epoch + test_images * rates.test_image_s
        raise BudgetError(f"a budget of {format_seconds(budget_s)} cannot hold one training "
                          f"step with its validation and test on this machine (about "
                          f"{format_seconds(needed / TARGET)} needed); give a larger --budget")
    epochs = math.ceil(best / steps_per_epoch)
    expected = (elapsed_s + best * rates.step_s + epochs * per_epoch
                + test_images * rates.test_image_s)
    return Plan(best, epochs, expected, rates, tta_views)


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
