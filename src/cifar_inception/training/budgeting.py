"""Fitting a run to a time budget (``--budget``): measure this machine's speed, plan the
steps, and plan again after the first epoch."""

from __future__ import annotations

import copy
import math
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import astuple, replace
from pathlib import Path

import torch

from cifar_inception import distributed
from cifar_inception.augment import normalize
from cifar_inception.budget import (
    EPOCH_FIXED_S,
    BudgetError,
    Plan,
    Rates,
    plan,
    time_per_call,
    affordable_views,
)
from cifar_inception.checkpoint import save_checkpoint
from cifar_inception.evaluation import (
    TTA_VIEW_COUNTS,
    log_probabilities,
    test_in_channels_last,
    views_for,
)
from cifar_inception.fileio import atomic_write_json
from cifar_inception.models.registry import model_options
from cifar_inception.recipes import TrainConfig
from cifar_inception.runs import BEST, CONFIG_FILE, LAST, read_record
from cifar_inception.training.optim import Lookahead, build_optimizer, optimise
from cifar_inception.training.setup import (
    Loop,
    autocast_for,
    seeded_generator,
    uses_channels_last,
)


def plan_budget(loop: Loop, test_images: int, started: float) -> Plan:
    """Measure this machine's speed on a scratch copy of the model, then plan the run."""
    rates = measure_rates(loop)
    # Every rank steps together: the slowest one sets the pace. Every rank must also plan
    # the same number of steps, so they all plan from the same rates (every one of them:
    # a rank's own epoch_s once made the ranks plan different epochs) and the same (the
    # latest) elapsed time.
    *slowest, elapsed = distributed.all_reduce(torch.tensor(
        [*astuple(rates), time.perf_counter() - started],
        dtype=torch.float64, device=loop.device), loop.ctx, op="max").tolist()
    budget, rates = loop.config.budget, Rates(*slowest)
    wanted = tuple(v for v in TTA_VIEW_COUNTS if v <= loop.config.tta_views)
    views = affordable_views(budget, test_images, rates.test_image_s, wanted) \
        if loop.config.tta else 0
    val_per_rank = math.ceil(loop.prepared.val_x.shape[0] / loop.ctx.world_size)
    return plan(budget, elapsed, rates,
                steps_per_epoch=loop.steps_per_epoch, val_images=val_per_rank,
                test_images=test_images * max(1, views), tta_views=views)


RANK_PROBE_STEPS = 4  # timed probe steps of each rank, after one untimed, in a split run
# How --widen-for-epochs widens: half the model's own width at a time, so that the channel
# counts of inception-cpu stay multiples of 16 (widths 1.25 and 1.75 give counts of 8 times an
# odd number, which train at a far lower rate on a CPU: BENCHMARKS.md), to three times it.
WIDTH_STEP = 0.5
MOST_WIDENING = 3.0


def widen_for_budget(loop: Loop, budget_plan: Plan, build: Callable[[TrainConfig], Loop],
                     test_images: int, started: float, emit: Callable[[str], None]
                     ) -> tuple[Loop, Plan]:
    """With ``widen_for_epochs``: the widest model that the budget still trains for that
    many epochs, each width's speed measured as the first one's was.

    A longer budget buys more epochs of the same network, and a small network stops
    gaining long before a large one does; so the epochs a budget buys beyond
    ``widen_for_epochs`` go into width instead (``build`` makes the loop of a wider
    config). A width the caller set (``--width``) is kept as it is, and a model without a
    width option (or whose default width is not 1) is left alone."""
    config, wanted = loop.config, loop.config.widen_for_epochs
    if (wanted is None or "width" in config.model_options
            or model_options(config.model).get("width") != 1.0):  # set, or none to widen
        return loop, budget_plan
    width, bought = 1.0, _epochs_bought(loop, budget_plan)
    if bought < wanted:
        emit(f"width 1: {bought:.1f} epochs fit, fewer than the {wanted:g} that widening "
             f"needs")
        return loop, budget_plan
    refused = ""
    while width + WIDTH_STEP <= MOST_WIDENING:
        wider = replace(config, model_options={**config.model_options,
                                               "width": width + WIDTH_STEP})
        candidate = build(wider)
        try:
            candidate_plan = plan_budget(candidate, test_images, started)
        except BudgetError:  # the measurements spent what was left: keep the last width
            refused = f"; the budget was spent before width {width + WIDTH_STEP:g} could train"
            break
        if _epochs_bought(candidate, candidate_plan) < wanted:
            refused = (f"; width {width + WIDTH_STEP:g} would have "
                       f"{_epochs_bought(candidate, candidate_plan):.1f}")
            break
        loop, budget_plan, width = candidate, candidate_plan, width + WIDTH_STEP
    emit(f"width {width:g}: the widest that trains for {wanted:g} epochs or more in the "
         f"budget ({_epochs_bought(loop, budget_plan):.1f} epochs{refused})")
    return loop, budget_plan


def _epochs_bought(loop: Loop, budget_plan: Plan) -> float:
    return budget_plan.train_steps / loop.steps_per_epoch


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
    autocast, channels_last = autocast_for(config, device), uses_channels_last(config, device)
    batch = distributed.per_rank_batch(config.batch_size, loop.ctx)
    images, targets = data.train_x[:batch], data.train_y[:batch]
    calls = 0

    def step() -> None:
        nonlocal calls
        augmented = loop.policy(images, generator=seeded_generator(device, "probe"))
        x = normalize(augmented, data.mean, data.std, channels_last=channels_last)
        optimise(net, optimizer, x, targets, loop.aux_weights, config.label_smoothing,
                 autocast)
        calls += 1
        if lookahead is not None:
            lookahead.after_step(calls, 1 << 30)
        _sync(device)

    # Each step of a run split into ranks all-reduces its gradients, so every rank must take
    # the same number of probe steps: counted, not timed (a timed count differs by rank, and
    # the ranks would fall out of step).
    step_s = (time_per_call(step, min_seconds=0.0, min_calls=RANK_PROBE_STEPS)
              if loop.ctx.enabled else time_per_call(step))
    model.eval()
    sample = data.val_x[:config.eval_batch_size]
    if sample.shape[0] == 0:
        sample = data.train_x[:config.eval_batch_size]

    def evaluate_sample(bf16: bool, in_channels_last: bool) -> Callable[[], None]:
        net = model.to(memory_format=torch.channels_last if in_channels_last
                       else torch.contiguous_format)

        def run() -> None:
            with autocast_for(config, device) if bf16 else nullcontext():
                log_probabilities(net, sample, data.mean, data.std,
                                  batch_size=config.eval_batch_size, device=device,
                                  channels_last=in_channels_last)
        return run

    per_image = 1.0 / sample.shape[0]
    val_s = time_per_call(evaluate_sample(True, channels_last), min_seconds=0.5,
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
    return Rates(step_s, val_s, test_s, epoch_s + EPOCH_FIXED_S)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def replan_budget(loop: Loop, budget_plan: Plan, run_started: float, epochs_done: int,
                  step_s: float, val_s: float, test_images: int,
                  emit: Callable[[str], None]) -> TrainConfig:
    """Plan the rest of the run again after ``epochs_done`` epochs, from their measured speed
    (``step_s`` seconds a step, each epoch's first few left out; ``val_s`` for a validation):
    a far longer measurement than the probe's few steps, which a busy machine can mislead,
    and one that follows a machine whose speed drifts. The schedules, fractions of the run,
    follow; a change under 1% is left alone. The run's config and config.json get the new
    plan. At least one more step stays, so the run ends as planned runs do (the lookahead's
    average is the last step's)."""
    config, ctx, steps_per_epoch = loop.config, loop.ctx, loop.steps_per_epoch
    done = min(config.train_steps, epochs_done * steps_per_epoch)
    val_per_rank = math.ceil(loop.prepared.val_x.shape[0] / ctx.world_size)
    # the same inputs on every rank, so that every rank plans the same steps
    step_s, val_image_s, elapsed = distributed.all_reduce(torch.tensor(
        [step_s, val_s / max(1, val_per_rank), time.perf_counter() - run_started],
        dtype=torch.float64, device=loop.device), ctx, op="max").tolist()
    rates = replace(budget_plan.rates, step_s=step_s, val_image_s=val_image_s)
    views = len(views_for(config.tta, config.tta_views))
    try:
        rest = plan(config.budget, elapsed, rates,
                    steps_per_epoch=steps_per_epoch, val_images=val_per_rank,
                    test_images=test_images * views).train_steps
    except BudgetError:  # the budget is spent already: end with one more step
        rest = 1
    total = done + max(1, rest)
    if abs(total - config.train_steps) <= 0.01 * config.train_steps:
        return config
    emit(f"budget re-planned after epoch {epochs_done} (measured "
         f"{config.batch_size / rates.step_s:,.0f} training images/s): "
         f"{total / steps_per_epoch:.2f} epochs, {total} steps in all")
    config = replace(config, train_steps=total, epochs=math.ceil(total / steps_per_epoch))
    if loop.run_dir is not None:
        record = read_record(loop.run_dir, emit)
        if record is not None:
            record["config"] = config.to_dict()
            atomic_write_json(loop.run_dir / CONFIG_FILE, record)
    return config
