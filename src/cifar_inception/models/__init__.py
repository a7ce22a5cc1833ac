"""Registered models. Importing this package registers every model module below."""

from cifar_inception.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
