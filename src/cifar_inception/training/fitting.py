"""A budget run's start: its threads and width chosen from the probe's measurements
(:func:`fit_budget`), and the width checked against the run's own first steps
(:class:`WidthCheck`; :func:`start_over_at_width` when they choose another)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from cifar_inception.budget import BudgetError, Plan
from cifar_inception.models.registry import can_widen
from cifar_inception.training import budgeting
from cifar_inception.training.budgeting import (
    FollowBudget,
    WidthCheck,
    fewer_views_line,
    plan_from_rates,
    settle_threads,
)
from cifar_inception.training.plan import plan_run
from cifar_inception.training.record import record_plan
from cifar_inception.training.setup import Loop, build_loop


def fit_budget(loop: Loop, test_images: int, started: float, emit: Callable[[str], None]
               ) -> tuple[Loop, FollowBudget]:
    """Measure, then plan (threads and width included) the run's length to the budget;
    the loop to train and what keeps its plan current. ``started``: the run's start
    (``time.perf_counter()``); ``test_images``: the final test's (0 without one)."""
    config = loop.config
    budget_plan = budgeting.plan_budget(loop, test_images, started)
    budget_plan = settle_threads(loop, budget_plan, test_images, started, emit)

    def build_wider(options: dict) -> Loop:
        wider = replace(loop.plan, model_options=options)  # measured before it is planned
        return build_loop(config, wider, loop.prepared, loop.ctx, loop.device, None)

    loop, budget_plan, width_check = widen_for_budget(loop, budget_plan, build_wider,
                                                      test_images, started, emit)
    return loop, follow_plan(loop, budget_plan, started, test_images, emit, width_check)


def follow_plan(loop: Loop, budget_plan: Plan, started: float, test_images: int,
                emit: Callable[[str], None], width_check: WidthCheck | None = None
                ) -> FollowBudget:
    """Give ``loop`` the plan a budget's measurements made, say it, and keep it current."""
    config = loop.config
    if config.tta and budget_plan.tta_views < config.tta_views:
        emit(fewer_views_line(config.tta_views, budget_plan.tta_views))
    loop.plan = plan_run(config, loop.steps_per_epoch, loop.plan.surroundings,
                         measured_steps=budget_plan.train_steps,
                         tta_views=budget_plan.tta_views, model_options=loop.plan.model_options)
    emit(budget_plan.describe(config.budget, loop.steps_per_epoch, config.batch_size))
    return FollowBudget(loop, budget_plan, started, test_images, emit, width_check)


def start_over_at_width(old: Loop, follow: FollowBudget, emit: Callable[[str], None]
                        ) -> tuple[Loop, FollowBudget]:
    """The run's first steps chose another width than the probe (``follow.restart_at``):
    a fresh model of that width replaces the run's (nothing was saved yet), planned from
    the rescaled rates; its config.json says so."""
    width, rates = follow.restart_at
    options = {**old.plan.model_options, "width": width}
    loop = build_loop(old.config, replace(old.plan, model_options=options), old.prepared,
                      old.ctx, old.device, None)
    loop.run_dir = old.run_dir
    budget_plan = plan_from_rates(loop, rates, follow.test_images, follow.run_started)
    follow = follow_plan(loop, budget_plan, follow.run_started, follow.test_images, emit)
    record_plan(loop, emit)
    return loop, follow


# How --widen-for-epochs widens: half the model's own width at a time, so that the channel
# counts of inception-cpu stay multiples of 16 (widths 1.25 and 1.75 give counts of 8 times an
# odd number, which train at a far lower rate on a CPU: BENCHMARKS.md), to three times it.
WIDTH_STEP = 0.5
MOST_WIDENING = 3.0


def widen_for_budget(loop: Loop, budget_plan: Plan, build: Callable[[dict], Loop],
                     test_images: int, started: float, emit: Callable[[str], None]
                     ) -> tuple[Loop, Plan, WidthCheck | None]:
    """With ``widen_for_epochs``: the widest model that the budget still trains for that
    many epochs, each width's speed measured as the first one's was.

    A longer budget buys more epochs of the same network, and a small network stops
    gaining long before a large one does; so the epochs a budget buys beyond
    ``widen_for_epochs`` go into width instead (``build`` makes the loop of the model
    with the options it is given). A width the caller set (``--width``) is kept as it is, and a model without a
    width option (or whose default width is not 1) is left alone.

    Returns the loop and plan chosen, and the :class:`WidthCheck` that the run's first steps
    make of the choice (None where nothing was chosen)."""
    config, wanted = loop.config, loop.config.widen_for_epochs
    if wanted is None or "width" in config.model_options or not can_widen(config.model):
        return loop, budget_plan, None
    width, bought = 1.0, _epochs_bought(loop, budget_plan)
    tried = {width: budget_plan.rates}
    if bought < wanted:
        emit(f"width 1: {bought:.1f} epochs fit, fewer than the {wanted:g} that widening "
             f"needs")
        return loop, budget_plan, WidthCheck(width, tried, wanted, loop.steps_per_epoch)
    refused = ""
    while width + WIDTH_STEP <= MOST_WIDENING:
        candidate = build({**config.model_options, "width": width + WIDTH_STEP})
        try:
            candidate_plan = budgeting.plan_budget(candidate, test_images, started)
        except BudgetError:  # the measurements spent what was left: keep the last width
            refused = f"; the budget was spent before width {width + WIDTH_STEP:g} could train"
            break
        tried[width + WIDTH_STEP] = candidate_plan.rates
        if _epochs_bought(candidate, candidate_plan) < wanted:
            refused = (f"; width {width + WIDTH_STEP:g} would have "
                       f"{_epochs_bought(candidate, candidate_plan):.1f}")
            break
        loop, budget_plan, width = candidate, candidate_plan, width + WIDTH_STEP
    emit(f"width {width:g}: the widest that trains for {wanted:g} epochs or more in the "
         f"budget ({_epochs_bought(loop, budget_plan):.1f} epochs{refused})")
    return loop, budget_plan, WidthCheck(width, tried, wanted, loop.steps_per_epoch)


def _epochs_bought(loop: Loop, budget_plan: Plan) -> float:
    return budget_plan.train_steps / loop.steps_per_epoch
