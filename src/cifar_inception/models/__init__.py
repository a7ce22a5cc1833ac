"""Registered models. Importing this package registers every model module below."""

# Each model module registers its builders when imported.
from cifar_inception.models import fast, googlenet, inception_v3, seed  # noqa: F401
from cifar_inception.models.blocks import InceptionOutputs
from cifar_inception.models.registry import create_model, list_models, register_model

__all__ = ["InceptionOutputs", "create_model", "list_models", "register_model"]
