"""Models with HetConv layers, registered by name (``create_model``, ``list_models``)."""

from ._registry import create_model, list_models, register_model
from .vgg import VGG, vgg16_cifar

__all__ = ["VGG", "create_model", "list_models", "register_model", "vgg16_cifar"]
