"""Models with HetConv layers, registered by name (``create_model``, ``list_models``)."""

from ._registry import create_model, list_models, register_model
from .resnet import ResNet, resnet18, resnet34, resnet50
from .vgg import VGG, vgg16_cifar

__all__ = [
    "ResNet",
    "VGG",
    "create_model",
    "list_models",
    "register_model",
    "resnet18",
    "resnet34",
    "resnet50",
    "vgg16_cifar",
]
