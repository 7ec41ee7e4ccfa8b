"""A registry of model constructors, so models are built by name and swept by the tests."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["register_model", "create_model", "list_models"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn`` under its ``__name__``."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"a model named {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model: ``create_model("vgg16_cifar", part=4, form="sparse")``.

    Raises:
        ValueError: ``name`` is not registered (the message lists the names that are).
    """
    if name not in _MODELS:
        raise ValueError(f"model ({name!r}) is not registered; available: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)
