"""What a run decided, apart from what was asked for.

:class:`~cifar_inception.recipes.TrainConfig` is what the user asked for and never changes
during a run. :class:`TrainPlan` is what the run made of it on this machine: its length
(the schedules' :class:`~cifar_inception.budget.RunPlan`), the model's options (a budget
may widen the model), the test-time views (a budget may take fewer), the precision, the
threads, the absolute data folder and the processes. :func:`plan_run` makes it; a budget's
re-plan replaces the plan's schedule only. config.json and every checkpoint record both, and
a resumed run continues the recorded plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from cifar_inception.budget import RunPlan
from cifar_inception.recipes import TrainConfig


@dataclass(frozen=True)
class Surroundings:
    """What this invocation settled before the data was loaded: they may differ when a run
    is resumed elsewhere (all are runtime settings, or follow from the machine)."""

    bf16: bool                  # bf16 autocast on the training device
    threads: int | None         # CPU threads per process (None on a GPU)
    data_dir: str | None        # absolute, so that evaluation finds it from anywhere
    processes: int | None       # None under a launcher: the launcher's


@dataclass(frozen=True)
class TrainPlan:
    """What the run decided: how long it trains and on what, fixed until a re-plan."""

    schedule: RunPlan           # total steps, and the progress of every schedule
    steps_per_epoch: int
    model_options: dict[str, Any] = field(default_factory=dict)
    tta_views: int = 0          # views of each test image in the final test (0: one)
    surroundings: Surroundings = Surroundings(False, None, None, None)

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    @property
    def epochs(self) -> int:
        return self.schedule.epochs(self.steps_per_epoch)

    def replanned(self, schedule: RunPlan) -> TrainPlan:
        """The same decisions with a budget's new schedule."""
        return replace(self, schedule=schedule)

    def to_dict(self) -> dict:
        """Flat, the schedule's fields first (a RunPlan reads its own back from it)."""
        return {**self.schedule.to_dict(), "steps_per_epoch": self.steps_per_epoch,
                "epochs": self.epochs, "model_options": dict(self.model_options),
                "tta_views": self.tta_views, **vars(self.surroundings)}

    @classmethod
    def from_dict(cls, values: dict, surroundings: Surroundings) -> TrainPlan:
        """A recorded plan, continued in this invocation's ``surroundings`` (the recorded
        precision kept: the steps must compute as they did)."""
        return cls(RunPlan.from_dict(values), int(values["steps_per_epoch"]),
                   dict(values["model_options"]), int(values["tta_views"]),
                   replace(surroundings, bf16=bool(values["bf16"])))


def run_length(config: TrainConfig, steps_per_epoch: int, measured: int | None = None) -> int:
    """The run's total steps, where epochs, budget and train_steps meet: a budget's steps
    (``measured`` on this machine), else ``train_steps``, else every epoch's. (An explicit
    --epochs or --train-steps has already replaced a recipe's budget in the config.)"""
    if config.budget is not None and measured is not None:
        return measured
    return config.train_steps or config.epochs * steps_per_epoch


def plan_run(config: TrainConfig, steps_per_epoch: int, surroundings: Surroundings, *,
             measured_steps: int | None = None, tta_views: int | None = None,
             model_options: dict[str, Any] | None = None) -> TrainPlan:
    """The plan of a run of ``config``: its length (:func:`run_length`), its schedules as
    fractions of it, and the model options and test-time views a budget chose (default:
    the config's)."""
    total = run_length(config, steps_per_epoch, measured_steps)

    def progress(fraction: float | None, epochs: float | None) -> float | None:
        """A schedule's end as progress: a fraction of the run, or epochs of it."""
        if fraction is not None:
            return round(fraction * total) / total
        return None if epochs is None else round(epochs * steps_per_epoch) / total

    schedule = RunPlan(total, progress(config.warmup_fraction, config.warmup_epochs),
                       progress(config.whiten_bias_fraction, config.whiten_bias_epochs))
    views = (config.tta_views if config.tta else 0) if tta_views is None else tta_views
    options = config.model_options if model_options is None else model_options
    return TrainPlan(schedule, steps_per_epoch, dict(options), views, surroundings)


def resumed_plan(config: TrainConfig, recorded_config: dict, recorded_plan: dict | None,
                 steps_per_epoch: int, surroundings: Surroundings) -> TrainPlan:
    """The plan a resumed run follows: the recorded one, unless the resume asks for another
    length (--epochs, --train-steps), which then replaces its schedule (the model's options
    and test-time views as decided)."""
    steps_again = recorded_config.get("train_steps") != config.train_steps
    epochs_again = recorded_config.get("epochs") != config.epochs
    if recorded_plan is None or "steps_per_epoch" not in recorded_plan:
        return plan_run(config, steps_per_epoch, surroundings)
    recorded = TrainPlan.from_dict(recorded_plan, surroundings)
    if not (steps_again or epochs_again):
        return recorded
    # A resume does not measure the machine again, and more --epochs alone replace the
    # steps the run was started with: whole epochs.
    asked = replace(config, budget=None,
                    train_steps=config.train_steps if steps_again else None)
    fresh = plan_run(asked, steps_per_epoch, recorded.surroundings,
                     model_options=recorded.model_options)
    return replace(fresh, tta_views=recorded.tta_views if config.tta else 0)
