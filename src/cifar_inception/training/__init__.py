"""Training: ``train(config)`` runs one training run, new or resumed, to its end.

The loop reads top to bottom in :mod:`~cifar_inception.training.loop`. What it uses:
:mod:`~cifar_inception.training.setup` (threads, the data on the device, the model, and the
``Loop`` that holds them), :mod:`~cifar_inception.training.optim` (the optimiser, the
learning-rate schedule, lookahead, the loss and one optimiser step),
:mod:`~cifar_inception.training.resume` (continuing a run),
:mod:`~cifar_inception.training.record` (the run folder and its config.json) and
:mod:`~cifar_inception.training.budgeting` (fitting a run to ``--budget``).
"""

from cifar_inception.errors import TrainingError
from cifar_inception.runs import BEST, CONFIG_FILE, LAST, METRICS_FILE
from cifar_inception.training.budgeting import FollowBudget, measure_rates, plan_budget
from cifar_inception.training.loop import (
    EpochResult,
    StopRequest,
    TrainResult,
    format_epoch_line,
    train,
    train_epoch,
    validation_metrics,
)
from cifar_inception.training.optim import (
    Lookahead,
    build_optimizer,
    lr_factor,
    optimise,
    resolve_aux_weights,
    split_outputs,
    training_loss,
)
from cifar_inception.training.record import hardware_info, run_record
from cifar_inception.training.resume import Position, resume_config
from cifar_inception.training.setup import (
    INIT_IMAGES,
    SPLIT_SEED,
    DeviceData,
    Loop,
    autocast_for,
    build_model,
    check_model,
    derived_seed,
    init_from_data,
    prepare_data,
    seeded_generator,
    uses_channels_last,
)

__all__ = [
    # the run
    "train", "resume_config", "TrainResult", "TrainingError",
    # the loop and its parts
    "Loop", "Position", "EpochResult", "StopRequest", "train_epoch", "validation_metrics",
    "format_epoch_line",
    # setup
    "DeviceData", "prepare_data", "build_model", "init_from_data", "check_model",
    "uses_channels_last", "autocast_for", "derived_seed", "seeded_generator",
    "SPLIT_SEED", "INIT_IMAGES",
    # optimiser, schedule, loss
    "build_optimizer", "lr_factor", "Lookahead", "optimise", "split_outputs",
    "training_loss", "resolve_aux_weights",
    # run record, budget
    "run_record", "hardware_info", "plan_budget", "measure_rates", "FollowBudget",
    # the run folder's files
    "BEST", "LAST", "CONFIG_FILE", "METRICS_FILE",
]
