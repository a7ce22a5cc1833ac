"""A model registry in the manner of timm: ``register_model``, ``create_model``, ``list_models``,
and each model's :class:`ModelInfo` beside it (as timm keeps ``default_cfgs``).

What training may use of a model, and the rules a new one follows, are in
:mod:`cifar_inception.models.hooks`; ``tests/test_models.py`` checks them for every
registered model."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch.nn as nn

from cifar_inception.data.specs import MAX_CLASSES
from cifar_inception.errors import ModelError
from cifar_inception.models.blocks import CIFAR_ONLY, ImageSizes


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the package knows of a model without building it."""

    recipe: str = "default"          # the recipe ``cifar-inception train MODEL`` uses
    sizes: ImageSizes = CIFAR_ONLY   # the image sides it accepts (``--image-size``)

    @property
    def min_size(self) -> int:
        return self.sizes.smallest

    @property
    def max_size(self) -> int | None:
        """The largest side it accepts; None: no limit of its own (the data's is 512)."""
        return self.sizes.largest


_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_INFO: dict[str, ModelInfo] = {}


def register_model(name: str, *, recipe: str = "default",
                   sizes: tuple[int, int | None] = CIFAR_ONLY
                   ) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a builder ``fn(num_classes=10, **options)`` available under ``name``,
    trained by ``recipe`` unless another is named, on square images whose side is within
    ``sizes`` (smallest, largest; largest None: any above the smallest). A model that does
    not say is taken to accept CIFAR's 32x32 only."""
    smallest, largest = sizes
    if smallest < 1 or (largest is not None and largest < smallest):
        raise ValueError(f"model {name!r}: image sizes {sizes} are not (smallest, largest)")

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = builder
        _INFO[name] = ModelInfo(recipe, ImageSizes(smallest, largest))
        return builder

    return decorator


def model_info(name: str) -> ModelInfo:
    get_builder(name)  # an unknown name is one line
    return _INFO[name]


def check_image_size(name: str, size: int) -> None:
    """Refuse, in one line, an image side the model does not accept: training calls it
    before loading the data, and loading a checkpoint before building its model."""
    sizes = model_info(name).sizes
    if not sizes.accepts(size):
        raise ModelError(f"model {name!r} takes images of {sizes.describe()}, not "
                         f"{size}x{size}")


def can_widen(name: str) -> bool:
    """Whether a budget may widen the model: it has a ``width`` option whose default is 1."""
    return model_options(name).get("width") == 1.0


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def get_builder(name: str) -> Callable[..., nn.Module]:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(list_models())
        raise ModelError(f"unknown model {name!r}; known models: {known}") from None


def model_purpose(name: str) -> str:
    """One line on what the model is for: the first line of its builder's docstring."""
    doc = (get_builder(name).__doc__ or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


def parse_options(pairs: list[str] | tuple[str, ...]) -> dict[str, object]:
    """Turn command-line ``KEY=VALUE`` strings into builder options.

    Values become booleans (``true``/``false``, any case), integers, floats, or else stay
    strings: ``["width=0.5", "fix_3x3=true"]`` -> ``{"width": 0.5, "fix_3x3": True}``.
    """
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ModelError(f"model option {pair!r} is not of the form key=value")
        if key in options:
            raise ModelError(f"model option {key!r} is given twice")
        options[key] = option_value(text.strip())
    return options


def option_value(text: str) -> object:
    """A command-line value as a boolean, integer, float, or else the string itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def create_model(name: str, num_classes: int = 10, **options) -> nn.Module:
    """Build a registered model. Unknown names and options fail with a one-line ModelError."""
    builder = get_builder(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or \
            not 1 <= num_classes <= MAX_CLASSES:
        raise ModelError(f"num_classes must be a whole number from 1 to {MAX_CLASSES:,}, "
                         f"not {num_classes!r}")
    check_model_options(name, options)
    return builder(num_classes=num_classes, **options)


def check_model_options(name: str, options: Iterable[str]) -> None:
    """Refuse an unknown model name, or option names the model's builder does not take;
    training calls it before loading the data, so that a typo fails at once."""
    known = model_options(name)
    unknown = sorted(set(options) - set(known))
    if not unknown or _takes_any_option(get_builder(name)):
        return
    accepted = ", ".join(known) if known else "none"
    what = "option" if len(unknown) == 1 else "options"
    raise ModelError(f"model {name!r} has no {what} {', '.join(map(repr, unknown))} "
                     f"(its options: {accepted})")


def model_options(name: str) -> dict[str, object]:
    """The options a model accepts, with their defaults (``num_classes`` aside)."""
    signature = inspect.signature(get_builder(name))
    return {
        param.name: param.default
        for param in signature.parameters.values()
        if param.name != "num_classes" and param.kind is not param.VAR_KEYWORD
    }


def _takes_any_option(builder: Callable[..., nn.Module]) -> bool:
    parameters = inspect.signature(builder).parameters.values()
    return any(param.kind is param.VAR_KEYWORD for param in parameters)
