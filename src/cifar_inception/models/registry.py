"""A model registry in the manner of timm: ``register_model``, ``create_model``, ``list_models``."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from cifar_inception.errors import ModelError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a builder ``fn(num_classes=10, **options)`` available under ``name``."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def get_builder(name: str) -> Callable[..., nn.Module]:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(list_models())
        raise ModelError(f"unknown model {name!r}; known models: {known}") from None


def create_model(name: str, num_classes: int = 10, **options) -> nn.Module:
    """Build a registered model. Unknown names and options fail with a one-line ModelError."""
    builder = get_builder(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer, not {num_classes!r}")
    try:
        return builder(num_classes=num_classes, **options)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            raise ModelError(f"model {name!r}: {exc}") from None
        raise
