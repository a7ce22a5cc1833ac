"""cifar-inception: Inception-family networks on CIFAR-10, from the data to a web demo.

The public API, in pipeline order::

    import cifar_inception as ci
    data = ci.load_cifar10()                   # uint8 arrays, labels, class names
    model = ci.create_model("googlenet", width=0.25)
    ci.list_models()

Submodules: ``data``, ``augment``, ``models``, ``recipes``, ``checkpoint``, ``training``,
``evaluation``, ``report``, ``summary``, ``predict``, ``export``, ``serve``.
Names are imported lazily, so ``import cifar_inception`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_cifar10": "cifar_inception.data",
    "CLASSES": "cifar_inception.data",
    "create_model": "cifar_inception.models",
    "list_models": "cifar_inception.models",
    "train": "cifar_inception.training",
    "evaluate": "cifar_inception.evaluation",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cifar_inception' has no attribute {name!r}")
