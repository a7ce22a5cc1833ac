"""Every training hyperparameter, and the named recipes that set them, in one place.

:class:`TrainConfig` lists every option of a training run with its default, help text,
bounds and command-line flag (see :mod:`cifar_inception.options`: the flags and the checks
are generated from these declarations, so an option is added with one edit). A *recipe* is
a named partial configuration; :func:`build_config` layers them::

    TrainConfig defaults  <  recipe  <  the recipe's entry for this model  <  explicit options

so any explicit option (a command-line flag) overrides the recipe.

Recipes:

``seed``
    The report's Keras runs, as closely as the report lets us tell: Adam (Keras defaults,
    lr 1e-3), batch 32 (Keras' default; the report does not say), a constant learning rate,
    no augmentation, hard one-hot targets (no label smoothing), every auxiliary head weighted
    1.0, the report's epochs and validation split (naive: 10 epochs on 40,000/10,000;
    inception-v2: 25 epochs on 45,000/5,000; the dimension-reduction GoogLeNet's log is not in
    the report, so it gets 10 epochs on 45,000/5,000).
``default``
    A CIFAR recipe for the CIFAR-tuned models: SGD with Nesterov momentum, a one-cycle schedule
    (linear warm-up, then linear decay to zero), label smoothing 0.1, weight decay 5e-4 (not
    on norms and biases), random crop (reflect padding 4) and flip.
``cpu``
    The first CPU recipe: ``inception-cpu`` for 6 epochs with the default recipe's
    ingredients (kept for comparison; ``cpu10`` replaced it as the CPU default).
``gpu``
    What ``cifar-inception train`` runs on a GPU: the best CIFAR-tuned model's full recipe.
``cpu10``
    What ``cifar-inception train`` runs on a machine without a GPU: the best Inception net
    that ten minutes buy on this machine. It trains ``inception-cpu`` (the first module of
    each group reducing the grid, ``reduce``; each module's two first convolutions run as
    one, ``fuse``) for a time budget (``budget``, 10 minutes), as wide as still trains 9
    epochs there (``widen_for_epochs``): it measures this machine's
    speed (at each width it tries), then fixes the number of steps so that training,
    validation and the final test end within the budget, with every schedule a fraction of
    the run. Precision and threads follow the CPU (bf16 only where it is native, every
    core). The fast CIFAR-10 trainers' tricks, each a switchable option (BENCHMARKS.md
    measures them): batches of 256, Nesterov SGD with a warm-up over 23% of the run and a
    linear decay to 7%, label smoothing 0.2, a whitening stem (frozen, its bias trained for
    the first quarter), batch norm with a 64x learning rate on its shifts, 2-pixel reflect
    translations and alternating flips, lookahead, test-time augmentation.
``fast``
    Time to accuracy on one GPU: the same tricks on the wider ``inception-fast``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cifar_inception.data.specs import (
    DEFAULT_IMAGE_SIZE,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    dataset_names,
)
from cifar_inception.options import (
    DEVICE_HELP,
    ConfigError,
    check_fields,
    is_number,
    option,
    parse_duration,
    runtime_fields,
)

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("onecycle", "cosine", "constant")
FLIP_MODES = ("random", "alternate")
PADDING_MODES = ("reflect", "zeros")

__all__ = ["ConfigError", "TrainConfig", "Recipe", "RECIPES", "FIELDS", "RUNTIME_FIELDS",
           "MAX_BUDGET_S", "build_config", "get_recipe", "list_recipes", "default_recipe_name", "validate"]


def _aux_weights_problem(weights: Any) -> str | None:
    if isinstance(weights, (list, tuple)):
        if all(_is_weight(w) for w in weights):
            return None
        return f"auxiliary weights must be numbers >= 0, not {list(weights)}"
    return None if _is_weight(weights) else \
        f"auxiliary weight must be a number >= 0, not {weights!r}"


def _is_weight(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and 0 <= value < float("inf")


def _views_problem(views: Any) -> str | None:
    return None if views in (2, 6) and not isinstance(views, bool) else \
        f"test-time views must be 2 or 6, not {views!r}"


def _device_problem(device: Any) -> str | None:
    ok = isinstance(device, str) and (device in ("auto", "cpu") or device.startswith("cuda"))
    return None if ok else f"device must be auto, cpu or cuda[:N], not {device!r}"


# The longest --budget: a week. The planner and its records work in seconds of one run; a
# longer "budget" is a typo (or a hostile value) rather than a plan, so it is refused.
MAX_BUDGET_S = 7 * 24 * 3600.0


def _budget_problem(seconds: Any) -> str | None:
    if is_number(seconds) and 0 < seconds <= MAX_BUDGET_S:
        return None
    return (f"budget must be more than 0 seconds and at most a week "
            f"({MAX_BUDGET_S:.0f} s), not {seconds!r}")


def _save_every_problem(seconds: Any) -> str | None:
    off_or_in_range = is_number(seconds) and (seconds == 0 or 60 <= seconds <= MAX_BUDGET_S)
    if seconds is None or off_or_in_range:
        return None
    return (f"save-every must be 0 (off), or at least 60 seconds (a save takes a while) and "
            f"at most a week, not {seconds!r}")


def parse_save_every(text: str) -> float:
    """``--save-every``: a duration, or ``off`` (0: no saves within an epoch)."""
    return 0.0 if text.strip().lower() in ("off", "never") else parse_duration(text)


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run, as asked for: a run never changes it (what the run
    decides is its plan, :class:`~cifar_inception.training.plan.TrainPlan`). Learning rate
    and batch size are global (all ranks)."""

    # what to train (the positional MODEL, --width and --option)
    model: str = option("googlenet", "registered model name", group="model", cli=False)
    model_options: dict[str, Any] = option(factory=dict, group="model", cli=False,
                                           label="model options")
    recipe: str | None = option(None, "named set of hyperparameters", cli=False)
    weights: str | None = option(
        None, "start from trained weights (fine-tuning): a shipped name such as cifar10 (see "
        "`cifar-inception models`), a .pt checkpoint or run folder, or a URL ending in "
        "#sha256=HEX; the model's options must be theirs", group="model",
        metavar="NAME|PATH|URL")
    # data (--data-dir and --no-download are shared with the other commands)
    dataset: str | None = option(
        None, "the dataset (default: cifar10, or the classes of an image-folder tree given "
        "as --data-dir, its folder names)", group="data",
        choices=dataset_names(), metavar="NAME")
    image_size: int = option(
        DEFAULT_IMAGE_SIZE, "resize every image to N x N pixels (default 32, CIFAR's own); "
        "the model must take that size (`cifar-inception models` lists them), and the "
        "checkpoint records it, so evaluate, predict, serve and export follow it",
        group="data", label="image size", minimum=MIN_IMAGE_SIZE, maximum=MAX_IMAGE_SIZE,
        metavar="N")
    data_dir: str | None = option(None, group="data", cli=False, runtime=True)
    download: bool = option(True, group="data", cli=False, runtime=True)
    val_size: int = option(5000, "training images held out for validation (0: none)",
                           group="data", label="validation size", minimum=0, metavar="N")
    train_limit: int | None = option(
        None, "train on a fixed random subset of N images (quick runs)", group="data",
        minimum=1, metavar="N")
    # optimisation
    epochs: int = option(30, "epochs to train (overrides a recipe's --budget)",
                         group="optimisation", minimum=1, metavar="N", runtime=True)
    budget: float | None = option(
        None, "train for as long as this allows on this machine, validation and the final "
        "test included: SECONDS or a duration such as 90s, 10m, 1h (measures this machine's "
        "speed, then fixes the number of steps; --epochs overrides it; at most a week)",
        group="optimisation", check=_budget_problem, parse=parse_duration, metavar="DURATION")
    widen_for_epochs: float | None = option(
        None, "with --budget: widen the model (its width option, in steps of 0.5 up to "
        "three times its width) while the budget still buys E epochs at that width's measured "
        "speed; a --width or --option width=W keeps that width", group="optimisation",
        above=0, maximum=1e6, metavar="E")
    train_steps: int | None = option(
        None, "total optimiser steps, the last epoch cut short (default: epochs x steps per "
        "epoch; --budget sets it)", group="optimisation", label="train steps", minimum=1,
        metavar="N", runtime=True)
    batch_size: int = option(512, "global batch size (split evenly over the ranks under "
                             "torchrun)", group="optimisation", label="batch size", minimum=1,
                             metavar="N")
    optimizer: str = option("sgd", "sgd (Nesterov momentum), adamw, or adam (as the report's "
                            "Keras runs)", group="optimisation", choices=OPTIMIZERS)
    lr: float = option(0.4, "peak learning rate, for the global batch", group="optimisation",
                       label="learning rate", above=0, metavar="LR")
    momentum: float = option(0.9, "SGD momentum; Adam's beta1", group="optimisation",
                             minimum=0, below=1, metavar="M")
    nesterov: bool = option(True, "Nesterov momentum for SGD", group="optimisation")
    weight_decay: float = option(5e-4, "weight decay (never on norms and biases)",
                                 group="optimisation", minimum=0, metavar="WD")
    schedule: str = option("onecycle", "per-step learning-rate schedule after the warm-up: "
                           "onecycle (linear to --final-lr), cosine, constant",
                           group="optimisation", choices=SCHEDULES)
    warmup_epochs: float = option(1.0, "linear warm-up from lr/10, in epochs (fractions "
                                  "allowed)", group="optimisation", label="warm-up epochs",
                                  minimum=0, maximum=1e6, metavar="E")
    warmup_fraction: float | None = option(
        None, "warm-up length as a fraction of the run (overrides --warmup-epochs)",
        group="optimisation", label="warm-up fraction", minimum=0, maximum=1, metavar="F")
    final_lr: float = option(0.0, "where the schedule ends, as a fraction of the peak",
                             group="optimisation", label="final learning rate", minimum=0,
                             maximum=1, metavar="F")
    norm_bias_lr: float = option(1.0, "learning-rate multiplier for norm shifts and biases",
                                 group="optimisation",
                                 label="norm/bias learning-rate multiplier", above=0,
                                 metavar="X")
    label_smoothing: float = option(0.1, group="optimisation", minimum=0, below=1,
                                    metavar="S")
    aux_weights: float | list[float] | None = option(
        None, "auxiliary-loss weights: one for every head, or one per head (default: the "
        "model's own)", group="optimisation", check=_aux_weights_problem, nargs="+",
        parse=float, metavar="W")
    # weight averaging (airbench's lookahead)
    lookahead: bool = option(False, "reset the weights to their moving average every few "
                             "steps, and end on it (airbench's lookahead)", group="optimisation")
    lookahead_steps: int = option(5, group="optimisation", minimum=1, metavar="K")
    lookahead_decay: float = option(0.95, "moving-average decay per step (ramped up by "
                                    "progress^3)", group="optimisation", minimum=0, below=1,
                                    metavar="D")
    # first layer, for models with init_from_data (a whitening stem)
    whiten_init: bool = option(True, "set a whitening stem from the training images (models "
                               "that have one)", group="optimisation")
    whiten_bias_epochs: float | None = option(
        None, "freeze the whitening stem's weights and train its bias for E epochs (default: "
        "the stem trains like any layer)", group="optimisation", minimum=0, maximum=1e6,
        metavar="E")
    whiten_bias_fraction: float | None = option(
        None, "the same as a fraction of the run (overrides --whiten-bias-epochs)",
        group="optimisation", minimum=0, maximum=1, metavar="F")
    # augmentation (on the device, in batches)
    crop_padding: int = option(4, "random crop after padding P pixels (0: no crop)",
                               group="augmentation", minimum=0, maximum=16, metavar="P")
    padding_mode: str = option("reflect", group="augmentation", choices=PADDING_MODES)
    flip: bool = option(True, "random horizontal flip", group="augmentation")
    flip_mode: str = option("random", "random flips, or alternate: each image mirrored every "
                            "other epoch", group="augmentation", choices=FLIP_MODES)
    cutout: int = option(0, "cutout square side (0: none)", group="augmentation",
                         label="cutout size", minimum=0, maximum=32, metavar="S")
    # how to run
    seed: int = option(0, group="run", minimum=0, metavar="N")
    device: str = option("auto", DEVICE_HELP, check=_device_problem,
                         runtime=True, metavar="DEVICE")
    amp: bool = option(True, "bf16 autocast on CUDA")
    channels_last: bool = option(True, "channels_last memory format on CUDA")
    cpu_amp: bool | None = option(
        None, "bf16 autocast on the CPU (default: where this CPU computes bf16 natively and "
        "faster, as with AVX-512 BF16 or AMX; fp32 elsewhere)")
    cpu_channels_last: bool = option(False, "channels_last memory format on the CPU")
    compile: bool = option(False, "torch.compile the model", runtime=True)
    sync_bn: bool = option(False, "synchronise batch-norm statistics across processes "
                           "(torchrun, CUDA)")
    processes: int | None = option(
        None, "processes that train on the CPU, the cores shared among them (default 1; "
        "under torchrun, torchrun's)", minimum=1, maximum=4096, metavar="N")
    num_threads: int | None = option(
        None, "CPU threads per process (default: the cores this process may use, shared "
        "among ranks)", flag="threads", label="threads", minimum=1, maximum=4096,
        metavar="N", runtime=True)
    eval_batch_size: int = option(1000, label="eval batch size", minimum=1, maximum=1 << 20,
                                  metavar="N", runtime=True)
    out_dir: str = option("runs", "folder that receives the run folders", flag="output",
                          metavar="DIR")
    name: str | None = option(None, "run folder name (default: MODEL-DATE-TIME)",
                              metavar="NAME")
    save_every: float | None = option(
        1800.0, "save last.pt also within an epoch, every DURATION of training (SECONDS or "
        "a duration such as 30m; default 30m; 0 or off: never), so that a run killed "
        "outright loses at most that much (Ctrl-C and SIGTERM save where the run is in any "
        "case)",
        check=_save_every_problem, parse=parse_save_every, metavar="DURATION", runtime=True)
    stop_after_epochs: int | None = option(
        None, "pause once N epochs are done; continue later with --resume", minimum=1,
        metavar="N", runtime=True)
    test: bool = option(True, "evaluate best.pt on the test set at the end", runtime=True)
    tta: bool = option(False, "test-time augmentation in that evaluation (flips and shifts)",
                       runtime=True)
    tta_views: int = option(6, "views of each test image with --tta: 2 (the image and its "
                            "mirror) or 6 (each also shifted 2 pixels up-left and down-right); "
                            "a --budget run may take fewer, or none, where they cost too much",
                            label="test-time views", choices=(2, 6), check=_views_problem,
                            runtime=True, metavar="N")
    dist_timeout: float = option(600.0, "seconds a process waits for the others under "
                                 "torchrun", label="distributed timeout", above=0,
                                 maximum=1e6, metavar="SECONDS", runtime=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))

# Options that only say how to run, not what is computed: a resumed run may change these.
RUNTIME_FIELDS = runtime_fields(TrainConfig)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    settings: dict[str, Any]
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: str | None = None  # the model the recipe trains when none is named


_SEED = Recipe(
    name="seed",
    description="the report's Keras runs: Adam 1e-3, batch 32, no augmentation, "
                "one-hot targets, every head weighted 1.0",
    settings=dict(optimizer="adam", lr=1e-3, momentum=0.9, weight_decay=0.0,
                  schedule="constant", warmup_epochs=0.0, batch_size=32, label_smoothing=0.0,
                  aux_weights=1.0, crop_padding=0, flip=False, cutout=0, epochs=10,
                  val_size=5000),
    per_model={
        "seed-naive": dict(epochs=10, val_size=10000),        # "40000/40000", "Epoch 1/10"
        # not in the report; channels_last runs its convolutions 1.2x as fast on a CPU
        "seed-googlenet": dict(epochs=10, val_size=5000, cpu_channels_last=True),
        "seed-inception-v2": dict(epochs=25, val_size=5000),  # "45000 ... 5000", "Epoch 1/25"
    },
)

_CIFAR = dict(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4,
              schedule="onecycle", warmup_epochs=1.0, label_smoothing=0.1, crop_padding=4,
              padding_mode="reflect", flip=True, cutout=0, val_size=5000)

# The small time-to-accuracy networks (frozen batch-norm scales, logits scaled by 1/9) want
# a high learning rate, small batches for short runs, stronger smoothing, 2-pixel shifts.
_FAST_NETS = dict(epochs=10, batch_size=128, lr=1.0, warmup_epochs=0.5, label_smoothing=0.2,
                  crop_padding=2)

_DEFAULT = Recipe(
    name="default",
    description="SGD Nesterov, one-cycle, label smoothing 0.1, wd 5e-4, crop+flip",
    settings=dict(_CIFAR, epochs=30, batch_size=512, lr=0.4),
    per_model={
        "googlenet": dict(epochs=30, batch_size=512, lr=0.4),
        "inception-v3": dict(epochs=30, batch_size=512, lr=0.4),
        "inception-cpu": _FAST_NETS,
        "inception-fast": _FAST_NETS,
        "baseline-plain": _FAST_NETS,
        # The report's networks, for its 10 epochs. Without batch norm they cannot take the
        # default's 0.4: seed-googlenet collapsed to chance in its warm-up epoch at it. A range
        # test (benchmarks/lr_range.py, docs/reproduction.md) found its loss falling fastest
        # from 0.04 to 0.09 at batch 512 and collapsing past 0.12: the peak is 0.05.
        "seed-googlenet": dict(epochs=10, lr=0.05, cpu_channels_last=True),
        "seed-naive": dict(epochs=10, lr=0.05),  # the same rate; not range-tested
    },
)

# Measured: one epoch (45,000 + 5,000 validation images) takes about 105 s on one core of
# the 2-core reference machine; 6 epochs are about ten minutes (docs/training.md).
_CPU = Recipe(
    name="cpu",
    description="about ten minutes on a 2-core CPU: inception-cpu, 6 epochs",
    settings=dict(_CIFAR, **{**_FAST_NETS, "epochs": 6}),
    model="inception-cpu",
)

_GPU = Recipe(
    name="gpu",
    description="the best CIFAR-tuned model's full default recipe",
    settings=dict(_DEFAULT.settings, **_DEFAULT.per_model["googlenet"]),
    model="googlenet",
)

# The fast CIFAR-10 trainers' recipe (airbench94's hyperparameters). Learning rates are for
# the mean loss over a batch of 1024; weight decay is PyTorch's (multiplied by the learning
# rate), so the decay per step at the peak is lr x weight_decay = 2e-3, as there.
_SPEED = dict(optimizer="sgd", batch_size=1024, lr=1.5, momentum=0.85, nesterov=True,
              weight_decay=2e-3 / 1.5, schedule="onecycle", final_lr=0.07, norm_bias_lr=64.0,
              label_smoothing=0.2, lookahead=True, lookahead_steps=5, lookahead_decay=0.95,
              whiten_init=True, crop_padding=2, padding_mode="reflect",
              flip=True, flip_mode="alternate", cutout=0, tta=True, val_size=5000)

# cpu10's own inception-cpu: the first module of each group pools inside its branches
# (reduce: a quarter more images per second for the same weights) and each module's two first
# convolutions run as one (fuse: the same function, a few per cent faster). Its groups keep
# the model's own widths, all widened alike: groups of 32/128/256 whose last two alone grow
# (widths, widen_first=false) measured level at 10 minutes and no better at 20
# (BENCHMARKS.md, "Where the channels go").
CPU10_MODEL_OPTIONS = {"reduce": True, "fuse": True}

_CPU10 = Recipe(
    name="cpu10",
    description="the best Inception net that ten minutes buy on this CPU: inception-cpu for a "
                "10-minute budget (training, validation and test), as wide as still trains 9 "
                "epochs, batches of 256, whitening stem, lookahead, alternating flips, TTA",
    # Precision (cpu_amp None: bf16 only where it is native) and threads (every core) follow
    # the machine; the budget fixes the epochs, and the schedules are fractions of the run.
    # Batches of 256, not airbench's 1024: a CPU computes no faster per image in larger
    # batches, and a run of a few epochs gains from 4x the steps. The learning rate scales
    # linearly with the batch (the weight decay per image stays the same), and lookahead
    # averages every 20 steps: the same 5,120 images as airbench's 5 x 1024. Its decay stays
    # 0.95 a step, so an update keeps at most 0.95^20 of the average where airbench keeps
    # 0.95^5: the average spans about a third of airbench's images (airbench's span, one
    # seed at 10 minutes: level; BENCHMARKS.md, "Smaller batches, a longer lookahead ...").
    settings=dict(_SPEED, batch_size=256, lr=0.375, lookahead_steps=20, epochs=12,
                  budget=600.0, warmup_fraction=0.23, whiten_bias_fraction=0.25,
                  cpu_channels_last=True),
    # Its own model (CPU10_MODEL_OPTIONS) takes the widest width that still trains 9 epochs
    # in the budget: width 1 for a few minutes, wider for longer budgets or faster machines
    # (BENCHMARKS.md, "Inception against the plain baseline").
    per_model={"inception-cpu": dict(model_options=CPU10_MODEL_OPTIONS, widen_for_epochs=9.0)},
    model="inception-cpu",
)

_FAST = Recipe(
    name="fast",
    description="seconds on one GPU: inception-fast, 10 epochs of 1024, bf16, whitening "
                "stem, lookahead, alternating flips, TTA",
    settings=dict(_SPEED, epochs=10, warmup_fraction=0.23, whiten_bias_fraction=0.3,
                  amp=True, channels_last=True),
    model="inception-fast",
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (_SEED, _DEFAULT, _CPU, _GPU, _CPU10, _FAST)}


def list_recipes() -> list[str]:
    return list(RECIPES)


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(
            f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}") from None


def default_recipe_name(model: str | None, *, cuda: bool) -> str:
    """The recipe used when none is named: by hardware without a model, else the one the
    model's registry entry names."""
    if model is None:
        return "gpu" if cuda else "cpu10"
    # Imported here: the models package imports the weights, which import the recipes.
    from cifar_inception.models.registry import model_info

    return model_info(model).recipe


# A schedule's length in epochs, and the same as a fraction of the run (which wins when set).
_FRACTION_OF = {"warmup_epochs": "warmup_fraction", "whiten_bias_epochs": "whiten_bias_fraction"}


def build_config(model: str | None = None, recipe: str | None = None, *, cuda: bool = False,
                 **overrides: Any) -> TrainConfig:
    """Layer defaults, recipe, the recipe's model entry and ``overrides`` into a checked config.

    An explicit ``epochs`` (or ``train_steps``) replaces a recipe's time budget, and an
    explicit ``warmup_epochs`` (``whiten_bias_epochs``) the recipe's warm-up (bias) fraction.
    """
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown training option(s): {', '.join(unknown)}")
    if "model" in overrides or "recipe" in overrides:
        raise ConfigError("pass model and recipe as arguments, not as overrides")
    recipe_name = recipe or default_recipe_name(model, cuda=cuda)
    chosen = get_recipe(recipe_name)
    model = model or chosen.model
    if model is None:
        raise ConfigError(f"recipe {recipe_name!r} does not name a model; give one")
    settings = {**chosen.settings, **chosen.per_model.get(model, {})}
    if chosen.model is not None and model != chosen.model:
        settings.pop("model_options", None)  # options belong to the recipe's own model
    if {"epochs", "train_steps"} & set(overrides):
        settings.pop("budget", None)
    for epochs_name, fraction_name in _FRACTION_OF.items():
        if epochs_name in overrides:  # an explicit length in epochs beats the recipe's fraction
            settings.pop(fraction_name, None)
    options = {**settings.pop("model_options", {}), **overrides.pop("model_options", {})}
    config = TrainConfig(model=model, recipe=recipe_name, model_options=options,
                         **{**settings, **overrides})
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Refuse values that cannot work, with the option's name in the message."""
    check_fields(config)
