"""A registry of model constructors, so models are built by name and swept by the tests."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

__all__ = ["register_model", "create_model", "list_models"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn`` under its ``__name__``.

    Raises:
        TypeError: ``fn`` is not a named callable.
        ValueError: a model of that name is already registered.
    """
    if not callable(fn) or not isinstance(getattr(fn, "__name__", None), str):
        raise TypeError(f"register_model expects a named function or class, got {type(fn).__name__} ({fn!r})")
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
        TypeError: ``name`` is not a str, or an argument the model does not take (the message
            lists those it takes).
        ValueError: ``name`` is not registered (the message lists the names that are).
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__} ({name!r})")
    if name not in _MODELS:
        raise ValueError(f"model ({name!r}) is not registered; available: {', '.join(list_models())}")
    fn = _MODELS[name]
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a callable without a signature: it checks its own arguments
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as error:
            unknown = sorted(set(kwargs) - set(signature.parameters))
            if not unknown:
                raise TypeError(f"create_model({name!r}): {error}") from None
            raise TypeError(f"{name} takes no argument {', '.join(map(repr, unknown))}; it takes "
                            f"{', '.join(signature.parameters)}") from None
    return fn(**kwargs)
