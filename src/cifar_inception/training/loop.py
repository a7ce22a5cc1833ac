"""The training loop, top to bottom.

``train(config)`` loads CIFAR-10 once, splits off the validation images, computes the
normalisation statistics on the training split, and moves every image to the device as uint8.
Each epoch then:

1. draws a permutation of the training images from a generator seeded by (seed, epoch);
2. per step, gathers the global batch, augments it on the device (crop, flip, cutout) with a
   generator seeded by (seed, epoch, step), keeps this rank's share, and normalises it;
3. runs forward (bf16 autocast and channels_last on CUDA) and backward on
   ``main loss + sum(aux weight x aux loss)``, steps the optimiser, and sets the learning rate
   of the next step from the schedule (a pure function of the step number);
4. validates, prints one Keras-like line, appends to ``metrics.jsonl`` and saves ``last.pt``
   (and ``best.pt`` when the validation accuracy improved), atomically.

Because the data order and the augmentation are functions of (seed, epoch, step), and the
checkpoint carries the optimiser state and the global RNG state (dropout), a resumed run
continues exactly where it stopped, even mid-epoch. Ctrl-C (or SIGTERM) finishes the current
step, saves ``last.pt`` and stops; a second Ctrl-C stops at once. An epoch longer than
``save_every`` (30 minutes; 0: off) also saves ``last.pt`` on its way, so that a run killed
outright loses at most that much. A NaN or infinite loss stops the run before anything of the bad
epoch is written.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from cifar_inception import distributed
from cifar_inception.augment import alternating_flips
from cifar_inception.checkpoint import save_checkpoint
from cifar_inception.devices import pick_device
from cifar_inception.distributed import DistContext
from cifar_inception.errors import CifarInceptionError, TrainingError
from cifar_inception.evaluation import (
    EVAL_FILE,
    accuracy_line,
    evaluate,
    log_probabilities,
)
from cifar_inception.fileio import append_jsonl
from cifar_inception.launch import under_launcher
from cifar_inception.recipes import TrainConfig, validate
from cifar_inception.runs import (
    BEST,
    LAST,
    METRICS_FILE,
    check_run_name,
    locked,
    read_history,
    resume_target,
)
from cifar_inception.training.budgeting import FollowBudget
from cifar_inception.training.fitting import fit_budget, start_over_at_width
from cifar_inception.training.plan import (
    Surroundings,
    TrainPlan,
    plan_run,
    resumed_plan,
)
from cifar_inception.training.lines import format_epoch_line, progress_bar, start_line
from cifar_inception.training.record import open_run_dir
from cifar_inception.training.result import TrainResult
from cifar_inception.training.resume import (
    Position,
    check_not_done,
    resume_config,
    resume_state,
)
from cifar_inception.training.setup import (
    DeviceData,
    Loop,
    autocast_for,
    build_loop,
    check_model,
    fit_cpu,
    fixed_stem_bias,
    more_order,
    prepare_data,
    seeded_generator,
    steps_per_epoch,
    uses_channels_last,
)
from cifar_inception.training.step import train_step
from cifar_inception.training.stopping import (
    StopRequest,
    diverged_message,
    interrupts_raise,
    stop_message,
)


def train(config: TrainConfig | None = None, data: Any = None, *,
          resume: str | os.PathLike | None = None,
          log: Callable[[str], None] | None = None,
          epoch_end: Callable[..., None] | None = None,
          started_at: float | None = None) -> TrainResult:
    """Train ``config.model`` in this process (one rank of a run, under torchrun or
    :func:`~cifar_inception.training.ranks.train_in_processes`) and return where the run is
    and how it went: :func:`prepare`, :func:`run_epochs`, :func:`finish`.

    ``data``: a loaded ``Dataset`` of ``config.image_size`` images (default:
    ``load_dataset(config.dataset, config.data_dir, image_size=config.image_size)``).
    ``resume``: a run folder (or its last.pt) to continue; ``config`` may then be None (the
    run's own) or come from :func:`resume_config`. ``log``: where progress lines go (default
    print; only rank 0 logs under torchrun). ``epoch_end(row, model, mean, std)``: called on
    rank 0 after each epoch is logged and saved, outside the epoch's timing (benchmarks use
    it to follow test accuracy against training time). ``started_at``: when the run began,
    as ``time.time()`` (default: now); a ``--budget`` counts from it, so the ranks of a run
    split into processes count their launch.
    """
    started_at = time.time() if started_at is None else started_at
    started = time.perf_counter() - (time.time() - started_at)  # a --budget counts from here
    config = _checked(config, resume)
    ctx = distributed.context_from_environment()
    device = distributed.device_for(ctx, pick_device(config.device))
    emit = (log or (lambda line: print(line, flush=True))) if ctx.is_main else (lambda _: None)
    threads_before = torch.get_num_threads()
    held = ExitStack()  # the run folder's lock, from before it is read to the end of the run
    try:
        surroundings = settle_surroundings(config, ctx, device, emit)
        distributed.init(ctx, device, config.dist_timeout)
        run = prepare(config, data, resume, ctx, device, emit, started, held, surroundings)
        run.epoch_end = epoch_end
        run_epochs(run)
        result = finish(run)
        # Every rank waits for the others before leaving the group: a rank that closed its
        # connections while another still held them open made gloo abort that one at exit
        # ("terminate called without an active exception").
        distributed.barrier(ctx)
        return result
    except CifarInceptionError as exc:
        if ctx.enabled:  # say which rank failed; torchrun then stops the others
            raise type(exc)(f"rank {ctx.rank}: {exc}") from None
        raise
    except RuntimeError as exc:
        if ctx.enabled and distributed.is_communication_failure(exc):
            raise distributed.communication_error(ctx, exc) from None
        raise
    finally:
        held.close()
        distributed.shutdown()
        torch.set_num_threads(threads_before)


def _checked(config: TrainConfig | None, resume: str | os.PathLike | None) -> TrainConfig:
    """The run's configuration (the run's own when resuming without one), checked."""
    if config is None:
        if resume is None:
            raise TrainingError("give a configuration or a run to resume")
        config = resume_config(resume)
    validate(config)
    return config


def settle_surroundings(config: TrainConfig, ctx: DistContext, device: torch.device,
                        emit: Callable[[str], None]) -> Surroundings:
    """What this invocation decides before the data: threads and precision (set, on a CPU),
    the data folder made absolute (so that evaluation finds it from anywhere) and, outside
    a launcher, one process where none was asked for."""
    threads, bf16 = None, config.amp
    if device.type == "cpu":
        threads, bf16, line = fit_cpu(config, ctx)
        emit(line)
    data_dir = (None if config.data_dir is None
                else str(Path(config.data_dir).expanduser().resolve()))
    processes = 1 if config.processes is None and not under_launcher() else config.processes
    return Surroundings(bf16, threads, data_dir, processes)


@dataclass
class Run:
    """A run in progress: its :class:`Loop`, the data, where it stands and how it ends."""

    loop: Loop
    data: Any                           # the loaded data set (the final test reads it)
    position: Position
    resumed: bool
    emit: Callable[[str], None]
    started: float                      # time.perf_counter() when the run began
    follow: FollowBudget | None = None  # a budget's plan, kept current as the run trains
    epoch_end: Callable[..., None] | None = None
    status: str = "completed"           # or "paused", "interrupted"
    message: str = ""


def prepare(config: TrainConfig, data: Any, resume: str | os.PathLike | None,
            ctx: DistContext, device: torch.device, emit: Callable[[str], None],
            started: float | None = None, held: ExitStack | None = None,
            surroundings: Surroundings | None = None) -> Run:
    """Everything before the first step: the run folder locked, the checkpoint to continue
    from, the data on the device, the run's plan (a budget's, the recorded one, or the
    config's), the model and optimiser, and the run folder with its config.json."""
    surroundings = surroundings or settle_surroundings(config, ctx, device, emit)
    check_model(config)  # before the data is loaded: a typo should fail at once
    if resume is None and config.name:
        check_run_name(config.name)
    held = held if held is not None else ExitStack()
    if resume is not None and ctx.is_main:  # one process per run folder, before reading it
        held.enter_context(locked(resume_target(resume).folder))
    ckpt, position = resume_state(config, resume)
    if data is None:
        from cifar_inception.data import load_dataset

        with distributed.main_first(ctx):  # rank 0 fills the decoded-array cache first
            data = load_dataset(config.dataset, surroundings.data_dir,
                                image_size=config.image_size, download=config.download,
                                progress=ctx.is_main)
    prepared = prepare_data(config, data, device)
    plan = _first_plan(config, ckpt, steps_per_epoch(config, prepared, ctx), surroundings)
    if ckpt is not None:
        check_not_done(config, plan.epochs, position, resume)
    loop = build_loop(config, plan, prepared, ctx, device, ckpt)
    run = Run(loop, data, position, ckpt is not None, emit,
              time.perf_counter() if started is None else started)
    if config.budget is not None and ckpt is None:
        test_images = len(data.test_labels) if config.test else 0
        run.loop, run.follow = fit_budget(run.loop, test_images, run.started, emit)
    if ctx.is_main:
        run.loop.run_dir = open_run_dir(run.loop, resume, ckpt, position, held, emit)
        emit(start_line(run.loop, resumed=run.resumed))
    return run


def _first_plan(config: TrainConfig, ckpt: dict | None, steps: int,
                surroundings: Surroundings) -> TrainPlan:
    """A new run's plan from its config (a budget's comes once measured), or the one a
    resumed run recorded."""
    if ckpt is None:
        return plan_run(config, steps, surroundings)
    training = ckpt["training"]
    return resumed_plan(config, training["config"], training.get("plan"), steps,
                        surroundings)


def run_epochs(run: Run) -> None:
    """Train epoch after epoch to the run's end (which a budget's re-plan may move), a pause
    (``stop_after_epochs``), or a stop request; ``run.status`` says which."""
    loop, ctx, emit = run.loop, run.loop.ctx, run.emit
    stop = StopRequest()
    with stop.installed():
        epoch = run.position.epoch - 1
        while (epoch := epoch + 1) < loop.plan.epochs:
            config = loop.config
            if config.stop_after_epochs is not None and epoch >= config.stop_after_epochs:
                run.status = "paused"
                run.message = stop_message(f"paused after epoch {epoch} of {loop.plan.epochs}",
                                            loop.run_dir, saved=False)
                emit(run.message)
                return
            started = time.perf_counter() - run.position.seconds
            if run.follow is not None:
                run.follow.start_epoch()
            result = _train_epoch_saving(run, epoch, stop, started)
            if run.follow is not None and run.follow.restart_at is not None:
                run.loop, run.follow = start_over_at_width(loop, run.follow, emit)
                loop, epoch = run.loop, epoch - 1
                continue
            if result.stopped_at is not None:  # Ctrl-C inside the epoch: save where we are
                run.position = _midway(run.position, epoch, result, started)
                if ctx.is_main:
                    save_checkpoint(loop.run_dir / LAST, loop.checkpoint(run.position, None))
                run.status = "interrupted"
                run.message = stop_message(
                    f"interrupted at epoch {epoch + 1}, step {result.stopped_at} of "
                    f"{loop.steps_in_epoch(epoch)}", loop.run_dir, saved=True)
                return
            _end_epoch(run, epoch, result, started)
            # Ctrl-C during validation or saving: the epoch is complete. Asked of every rank,
            # since a signal reaches each at its own moment and they must all stop here.
            if distributed.any_rank(stop.requested, ctx, loop.device):
                run.status = "interrupted"
                run.message = stop_message(f"interrupted after epoch {epoch + 1}",
                                            loop.run_dir, saved=True)
                return


def _train_epoch_saving(run: Run, epoch: int, stop: StopRequest,
                        started: float) -> EpochResult:
    """:func:`train_epoch`, with last.pt saved every ``config.save_every`` seconds of it:
    the epoch pauses at a step, saves where it is (as an interrupted run does), and goes on
    from there, so a run killed outright (power lost, a machine taken back) loses at most
    that much. Nothing computed changes: the rest of the epoch is what a resume would do."""
    loop, every = run.loop, run.loop.config.save_every
    while True:
        save_at = time.perf_counter() + every if every else None  # None or 0: never
        result = train_epoch(loop, epoch, run.position, stop, run.follow, save_at=save_at)
        if not result.paused_to_save:
            return result
        run.position = _midway(run.position, epoch, result, started)
        if loop.ctx.is_main:
            save_checkpoint(loop.run_dir / LAST, loop.checkpoint(run.position, None))


def _midway(position: Position, epoch: int, result: EpochResult, started: float) -> Position:
    """Where a run stands when it stopped ``result.stopped_at`` steps into ``epoch``."""
    return replace(position, epoch=epoch, step=result.stopped_at, loss_sum=result.loss_sum,
                   correct=result.correct, seen=result.seen,
                   seconds=time.perf_counter() - started)


def _end_epoch(run: Run, epoch: int, result: EpochResult, started: float) -> None:
    """Validate, let a budget plan again, then log and save the epoch."""
    loop = run.loop
    trained_s = time.perf_counter() - started
    with record_function("validation"):
        val_loss, val_acc = validation_metrics(loop.model, loop.prepared, loop.config,
                                               loop.device, loop.ctx, bf16=loop.bf16)
    if run.follow is not None and epoch + 1 < loop.plan.epochs:
        run.follow.after_epoch(loop, epoch + 1, time.perf_counter() - started - trained_s)
    row = {"epoch": epoch + 1, "seconds": round(time.perf_counter() - started, 3),
           "train_loss": result.loss_sum / result.seen,
           "train_acc": result.correct / result.seen,
           "val_loss": val_loss, "val_acc": val_acc, "lr": result.lr}
    run.position = _end_of_epoch(loop, run.position, row, run.emit)
    if run.epoch_end is not None and loop.ctx.is_main:
        run.epoch_end(row, loop.model, loop.prepared.mean, loop.prepared.std)


def finish(run: Run) -> TrainResult:
    """After the last epoch: the test of best.pt (on rank 0, when the run completed and
    asks for it), and what the run returns."""
    loop, ctx, position = run.loop, run.loop.ctx, run.position
    history = read_history(loop.run_dir) if ctx.is_main else []
    best = next((r for r in history if r["epoch"] == position.best_epoch), None)
    test = None
    if run.status == "completed" and ctx.is_main and loop.config.test:
        try:
            with interrupts_raise():
                test = _final_test(loop, run.data, position.best_epoch, run.emit)
        except KeyboardInterrupt:  # eval.json is written atomically: none, or a whole one
            run.status = "interrupted"
            run.message = stop_message(f"interrupted during the test of {BEST}",
                                        loop.run_dir, saved=False)
    return TrainResult(loop.run_dir, run.status, position.epoch, history, best, test,
                       run.message)


def _final_test(loop: Loop, data: Any, best_epoch: int | None,
                emit: Callable[[str], None]) -> dict:
    """Evaluate best.pt on the test set, writing eval.json, and log the result (the test-time
    views as planned: a budget may take fewer, or none)."""
    views = loop.plan.tta_views
    test = evaluate(loop.run_dir / BEST, data, device=str(loop.device),
                    batch_size=loop.config.eval_batch_size, tta=views > 0,
                    tta_views=views or loop.config.tta_views)
    emit(f"test ({BEST}, epoch {best_epoch}"
         f"{f', {views} test-time views' if views else ''}): "
         f"loss {test['test_loss']:.4f} - {accuracy_line(test)} ({loop.run_dir / EVAL_FILE})")
    return test


@dataclass(frozen=True)
class EpochResult:
    """What :func:`train_epoch` returns: the epoch's sums over all ranks (a resumed epoch's
    earlier steps included), and how the epoch ended."""

    loss_sum: float            # sum of the batches' mean loss x their size
    correct: float             # training images the main head got right
    seen: float                # training images stepped on
    lr: float                  # the learning rate of the last step
    stopped_at: int | None     # steps done when a stop request ended the epoch early, else None
    paused_to_save: bool = False  # stopped_at is a pause to save last.pt, not a stop


def train_epoch(loop: Loop, epoch: int, position: Position, stop: StopRequest,
                follow: FollowBudget | None = None, save_at: float | None = None
                ) -> EpochResult:
    """The steps of one epoch, from ``position.step`` on.

    Returns the global (loss sum, correct, seen) of the epoch, the last learning rate, and
    the number of steps done when a stop request ended the epoch early (else None).
    ``follow``: a budget's plan, kept current after the steps (the epoch's length with it).
    ``save_at``: a ``time.perf_counter()`` after which the epoch pauses at the next checked
    step so that the caller can save (``paused_to_save``).
    """
    config, ctx, device, data = loop.config, loop.ctx, loop.device, loop.prepared
    n_train = data.train_x.shape[0]
    per_rank = distributed.per_rank_batch(config.batch_size, ctx)
    order = torch.randperm(n_train, device=device,
                           generator=seeded_generator(device, config.seed, "order", epoch))
    # Partial sums of an interrupted epoch are global; rank 0 carries them on.
    carried = [position.loss_sum, position.correct, position.seen] if ctx.is_main \
        else [0.0, 0.0, 0.0]
    sums = torch.tensor(carried, dtype=torch.float64, device=device)
    check_every = 10 if loop.cuda else 1  # a check syncs CUDA; the CPU pays nothing
    flips = None
    if config.flip and config.flip_mode == "alternate":  # the same draw every epoch
        flips = alternating_flips(n_train, epoch,
                                  generator=seeded_generator(device, config.seed, "flips"))
    stem_bias = fixed_stem_bias(loop)
    first = epoch * loop.steps_per_epoch  # global index of the epoch's first step
    loop.model.train()
    bar = progress_bar(loop.steps_in_epoch(epoch), position.step, epoch, loop.plan.epochs, ctx)
    lr, stopped_at = loop.lr_at(first + position.step), None
    clock_zero = follow.run_started if follow is not None else time.perf_counter()
    step = position.step
    while step < loop.steps_in_epoch(epoch):  # a budget's plan may move the epoch's end
        lr = loop.lr_at(first + step)
        if (step + 1) * config.batch_size > order.numel():  # a sliver folded in
            order = more_order(order, n_train, device, config.seed, epoch)
        index = order[step * config.batch_size:(step + 1) * config.batch_size]
        frozen = (stem_bias if stem_bias is not None and not loop.bias_trains_at(first + step)
                  else None)
        loss, logits, targets = train_step(
            loop, data.train_x[index], data.train_y[index], lr=lr,
            generator=seeded_generator(device, config.seed, "augment", epoch, step),
            flip_mask=None if flips is None else flips[index], frozen=frozen)
        sums += torch.stack([loss.detach().double() * per_rank,
                             (logits.argmax(1) == targets).sum().double(),
                             torch.tensor(float(per_rank), dtype=torch.float64, device=device)])
        step += 1

        due = step % check_every == 0 or step >= loop.steps_in_epoch(epoch)
        if due:
            # One collective for the flags and the time, so every rank stops (or pauses to
            # save) at the same step and follows the same plan.
            now = time.perf_counter()
            stop_now, diverged, elapsed, save_now = distributed.all_reduce(torch.tensor(
                [float(stop.requested), float(not torch.isfinite(sums[0])), now - clock_zero,
                 float(save_at is not None and now >= save_at)],
                dtype=torch.float64, device=device), ctx, op="max").tolist()
            if diverged:
                bar.close()
                raise TrainingError(diverged_message(loop.run_dir, epoch, step - 1, lr))
            if follow is not None:
                follow.after_step(loop, first + step, epoch, elapsed)
                if follow.restart_at is not None:  # another width: the run starts over
                    break
        if loop.lookahead is not None:  # after the plan is settled: the last step ends on it
            loop.lookahead.after_step(first + step, loop.total_steps,
                                      loop.run_plan().at(first + step))
        if not due:
            continue
        last = step >= loop.steps_in_epoch(epoch)
        bar.total = loop.steps_in_epoch(epoch)
        bar.update(step - bar.n)
        if bar.n % 10 == 0 or last:
            bar.set_postfix(loss=f"{sums[0].item() / max(1.0, sums[2].item()):.4f}")
        if (stop_now or save_now) and not last:
            stopped_at = step
            break
    bar.close()
    loss_sum, correct, seen = distributed.all_reduce(sums, ctx).tolist()
    return EpochResult(loss_sum, correct, seen, lr, stopped_at,
                       paused_to_save=stopped_at is not None and not stop_now)


@torch.no_grad()
def validation_metrics(model: nn.Module, prepared: DeviceData, config: TrainConfig,
                       device: torch.device, ctx: DistContext, *, bf16: bool
                       ) -> tuple[float | None, float | None]:
    """Validation loss (plain cross-entropy of the main head) and accuracy, over all ranks."""
    if prepared.val_x.shape[0] == 0:
        return None, None
    distributed.broadcast_buffers(model, ctx)  # every rank evaluates rank 0's model
    model.eval()
    images = prepared.val_x[ctx.rank::ctx.world_size]
    labels = prepared.val_y[ctx.rank::ctx.world_size]
    with autocast_for(bf16, device):  # as in training: bf16 when the run uses it
        log_probs = log_probabilities(model, images, prepared.mean, prepared.std,
                                      batch_size=config.eval_batch_size, device=device,
                                      channels_last=uses_channels_last(config, device))
    labels_cpu = labels.cpu()
    sums = torch.tensor([float(F.nll_loss(log_probs, labels_cpu, reduction="sum")),
                         float((log_probs.argmax(1) == labels_cpu).sum()), float(len(labels))],
                        dtype=torch.float64, device=device)
    distributed.all_reduce(sums, ctx)
    model.train()
    return float(sums[0] / sums[2]), float(sums[1] / sums[2])


def _end_of_epoch(loop: Loop, position: Position, row: dict,
                  emit: Callable[[str], None]) -> Position:
    """Log the epoch, then save best.pt (if it improved) and last.pt; the new position."""
    score = row["val_acc"] if row["val_acc"] is not None else float(row["epoch"])  # the last
    improved = position.best_score is None or score > position.best_score
    position = Position(row["epoch"], 0,
                        best_score=score if improved else position.best_score,
                        best_epoch=row["epoch"] if improved else position.best_epoch)
    if loop.ctx.is_main:
        emit(format_epoch_line(row, loop.plan.epochs))
        append_jsonl(loop.run_dir / METRICS_FILE, row)
        if improved:
            save_checkpoint(loop.run_dir / BEST,
                            loop.checkpoint(position, row, with_training=False))
        save_checkpoint(loop.run_dir / LAST, loop.checkpoint(position, row))
    return position
