"""Every training hyperparameter, and the named recipes that set them, in one place.

:class:`TrainConfig` lists every option of a training run with its default. A *recipe* is a
named partial configuration; :func:`build_config` layers them::

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
    What ``cifar-inception train`` runs on a machine without a GPU: ``inception-cpu`` (the
    small Inception net built for the CPU) with the default recipe's ingredients tuned for
    it, sized to about ten minutes of training on a 2-core CPU (docs/training.md gives the
    measurement).
``gpu``
    What ``cifar-inception train`` runs on a GPU: the best CIFAR-tuned model's full recipe.
``cpu10``
    Time to accuracy on a 2-core CPU, and what ``cifar-inception train`` runs on a machine
    without a GPU: ``inception-cpu`` for about ten minutes of training with the fast
    CIFAR-10 trainers' tricks, each a switchable option (BENCHMARKS.md measures them):
    bf16 autocast and channels_last on the CPU, batches of 1024, Nesterov SGD with a short
    warm-up and a linear decay to 7%, label smoothing 0.2, a whitening stem (frozen, its
    bias trained 3 epochs), batch norm with a 64x learning rate on its shifts, 2-pixel
    reflect translations and alternating flips, lookahead, and test-time augmentation.
``fast``
    Time to accuracy on one GPU: the same tricks on the wider ``inception-fast``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cifar_inception.errors import CifarInceptionError

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("onecycle", "cosine", "constant")
FLIP_MODES = ("random", "alternate")
PADDING_MODES = ("reflect", "zeros")


class ConfigError(CifarInceptionError):
    """An unknown recipe, an unknown option or a value out of range."""


@dataclass
class TrainConfig:
    """Every option of a training run. Learning rate and batch size are global (all ranks)."""

    # what to train
    model: str = "googlenet"
    model_options: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None
    # data
    data_dir: str | None = None
    download: bool = True
    val_size: int = 5000              # held out from the 50,000 training images; 0 = none
    train_limit: int | None = None    # train on a seeded random subset of this many images
    # optimisation
    epochs: int = 30
    batch_size: int = 512             # global: split evenly over the ranks under torchrun
    optimizer: str = "sgd"            # sgd (with Nesterov momentum by default), adamw, adam
    lr: float = 0.4                   # peak learning rate, for the global batch
    momentum: float = 0.9             # SGD momentum; Adam's beta1
    nesterov: bool = True
    weight_decay: float = 5e-4        # never applied to norms and biases
    schedule: str = "onecycle"        # onecycle: warm-up then linear to final_lr; cosine; constant
    warmup_epochs: float = 1.0        # linear warm-up from lr/10 (fractions of epochs allowed)
    final_lr: float = 0.0             # where onecycle and cosine end, as a fraction of the peak
    norm_bias_lr: float = 1.0         # learning-rate multiplier for norm shifts and biases
    label_smoothing: float = 0.1
    aux_weights: float | list[float] | None = None  # None: the model's own defaults
    # weight averaging (airbench's lookahead)
    lookahead: bool = False           # every lookahead_steps, reset the weights to their EMA
    lookahead_steps: int = 5
    lookahead_decay: float = 0.95     # EMA decay per step, ramped up by (progress)^3
    # first layer, for models with init_from_data (a whitening stem)
    whiten_init: bool = True          # set the stem from the training images before step 1
    whiten_bias_epochs: float | None = None  # freeze the stem's weights, train its bias this
    #                                   many epochs; None: the stem trains like any layer
    # augmentation (on the device, in batches)
    crop_padding: int = 4             # 0 = no random crop
    padding_mode: str = "reflect"     # reflect or zeros
    flip: bool = True
    flip_mode: str = "random"         # random, or alternate: each image mirrored every other epoch
    cutout: int = 0                   # side of the cutout square; 0 = none
    # how to run
    seed: int = 0
    device: str = "auto"              # auto: CUDA when present, else the CPU
    amp: bool = True                  # bf16 autocast, on CUDA only
    channels_last: bool = True        # on CUDA only
    cpu_amp: bool = False             # bf16 autocast on the CPU (fast with AVX-512 BF16 or AMX)
    cpu_channels_last: bool = False   # channels_last on the CPU (faster oneDNN convolutions)
    compile: bool = False             # torch.compile the model
    sync_bn: bool = False             # SyncBatchNorm under torchrun (CUDA only)
    num_threads: int | None = None    # CPU threads per process; None: every core available
    eval_batch_size: int = 1000
    out_dir: str = "runs"             # run folders go in here
    name: str | None = None           # run folder name; None: <model>-<date>-<time>
    stop_after_epochs: int | None = None  # pause once this many epochs are done (resume later)
    test: bool = True                 # evaluate best.pt on the test set at the end
    tta: bool = False                 # ... with test-time augmentation (flips and shifts)
    dist_timeout: float = 600.0       # seconds a rank waits for the others before failing

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))

# Options that only say how to run, not what is computed: a resumed run may change these.
RUNTIME_FIELDS = ("device", "num_threads", "eval_batch_size", "stop_after_epochs", "test",
                  "dist_timeout", "data_dir", "download", "compile", "epochs", "tta")


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
        "seed-googlenet": dict(epochs=10, val_size=5000),     # not in the report
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
              whiten_init=True, whiten_bias_epochs=3.0, crop_padding=2, padding_mode="reflect",
              flip=True, flip_mode="alternate", cutout=0, tta=True, val_size=5000)

_CPU10 = Recipe(
    name="cpu10",
    description="about ten minutes on a 2-core CPU: inception-cpu, 12 epochs of 1024, bf16, "
                "whitening stem, lookahead, alternating flips, TTA",
    # One thread: on a machine that also runs anything else, two threads of this small
    # network stall on each other (BENCHMARKS.md); --threads 2 on an idle machine.
    settings=dict(_SPEED, epochs=12, warmup_epochs=2.76, cpu_amp=True,  # 23% of the run
                  cpu_channels_last=True, num_threads=1),
    model="inception-cpu",
)

_FAST = Recipe(
    name="fast",
    description="seconds on one GPU: inception-fast, 10 epochs of 1024, bf16, whitening "
                "stem, lookahead, alternating flips, TTA",
    settings=dict(_SPEED, epochs=10, warmup_epochs=2.3, amp=True, channels_last=True),  # 23%
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
    """The recipe used when none is named: by hardware without a model, else by model family."""
    if model is None:
        return "gpu" if cuda else "cpu10"
    return "seed" if model.startswith("seed-") else "default"


def build_config(model: str | None = None, recipe: str | None = None, *, cuda: bool = False,
                 **overrides: Any) -> TrainConfig:
    """Layer defaults, recipe, the recipe's model entry and ``overrides`` into a checked config."""
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
    options = {**settings.pop("model_options", {}), **overrides.pop("model_options", {})}
    config = TrainConfig(model=model, recipe=recipe_name, model_options=options,
                         **{**settings, **overrides})
    validate(config)
    return config


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: TrainConfig) -> None:
    """Refuse values that cannot work, with the option's name in the message."""
    c = config
    _require(isinstance(c.epochs, int) and c.epochs >= 1, f"epochs must be >= 1, not {c.epochs}")
    _require(isinstance(c.batch_size, int) and c.batch_size >= 1,
             f"batch size must be >= 1, not {c.batch_size}")
    _require(c.eval_batch_size >= 1, f"eval batch size must be >= 1, not {c.eval_batch_size}")
    _require(c.lr > 0, f"learning rate must be > 0, not {c.lr}")
    _require(0 <= c.momentum < 1, f"momentum must be in [0, 1), not {c.momentum}")
    _require(c.weight_decay >= 0, f"weight decay must be >= 0, not {c.weight_decay}")
    _require(0 <= c.label_smoothing < 1,
             f"label smoothing must be in [0, 1), not {c.label_smoothing}")
    _require(c.warmup_epochs >= 0, f"warm-up epochs must be >= 0, not {c.warmup_epochs}")
    _require(c.optimizer in OPTIMIZERS,
             f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {c.optimizer!r}")
    _require(c.schedule in SCHEDULES,
             f"schedule must be one of {', '.join(SCHEDULES)}, not {c.schedule!r}")
    _require(c.flip_mode in FLIP_MODES,
             f"flip mode must be one of {', '.join(FLIP_MODES)}, not {c.flip_mode!r}")
    _require(0 <= c.final_lr <= 1, f"final learning rate must be in [0, 1], not {c.final_lr}")
    _require(c.norm_bias_lr > 0,
             f"norm/bias learning-rate multiplier must be > 0, not {c.norm_bias_lr}")
    _require(isinstance(c.lookahead_steps, int) and c.lookahead_steps >= 1,
             f"lookahead steps must be >= 1, not {c.lookahead_steps}")
    _require(0 <= c.lookahead_decay < 1,
             f"lookahead decay must be in [0, 1), not {c.lookahead_decay}")
    _require(c.whiten_bias_epochs is None or c.whiten_bias_epochs >= 0,
             f"whiten bias epochs must be >= 0, not {c.whiten_bias_epochs}")
    _require(c.padding_mode in PADDING_MODES,
             f"padding mode must be one of {', '.join(PADDING_MODES)}, not {c.padding_mode!r}")
    _require(0 <= c.crop_padding <= 16, f"crop padding must be in [0, 16], not {c.crop_padding}")
    _require(0 <= c.cutout <= 32, f"cutout size must be in [0, 32], not {c.cutout}")
    _require(c.val_size >= 0, f"validation size must be >= 0, not {c.val_size}")
    _require(c.train_limit is None or c.train_limit >= 1,
             f"train limit must be >= 1, not {c.train_limit}")
    _require(c.stop_after_epochs is None or c.stop_after_epochs >= 1,
             f"stop after epochs must be >= 1, not {c.stop_after_epochs}")
    _require(c.num_threads is None or c.num_threads >= 1,
             f"threads must be >= 1, not {c.num_threads}")
    _require(c.dist_timeout > 0, f"distributed timeout must be > 0, not {c.dist_timeout}")
    weights = c.aux_weights
    if isinstance(weights, (list, tuple)):
        _require(all(isinstance(w, (int, float)) and w >= 0 for w in weights),
                 f"auxiliary weights must be numbers >= 0, not {list(weights)}")
    else:
        _require(weights is None or (isinstance(weights, (int, float)) and weights >= 0),
                 f"auxiliary weight must be a number >= 0, not {weights!r}")
    _require(isinstance(c.model_options, dict), "model options must be a mapping")
    _require(c.device == "auto" or c.device == "cpu" or c.device.startswith("cuda"),
             f"device must be auto, cpu or cuda[:N], not {c.device!r}")
