"""Argument checks shared by the layers, the pattern and the converters.

Every check raises before any work starts, with one sentence that names the argument, the value
that was given and what was expected.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch

__all__ = ["PADDING_MODES", "MissingExtraError", "centre_padding", "check_bool", "check_device", "check_dtype",
           "check_input", "check_int", "check_model", "check_odd", "check_padding", "check_padding_mode", "check_tuple",
           "import_object"]


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that provides it.

    The command line reports it in one line (exit status 2), like a user's mistake.
    """


def check_model(model: object) -> None:
    """Raise ``TypeError`` unless ``model`` is an ``nn.Module``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a ``bool``: a truthy string such as ``"no"`` or an int is refused
    rather than read as True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def check_dtype(value: object, name: str = "dtype") -> object:
    """Return ``value`` if it is None or a floating-point or complex ``torch.dtype`` (what a
    layer's parameters can be: autograd trains no integer tensor)."""
    if value is None:
        return value
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype or None, got {type(value).__name__} ({value!r})")
    if not (value.is_floating_point or value.is_complex):
        raise ValueError(f"{name} ({value}) must be a floating-point or complex torch.dtype, e.g. torch.float32")
    return value


def check_device(value: object, name: str = "device") -> object:
    """Return ``value`` if it is None or names a device (``torch.device``, a string such as
    ``"cuda:0"``, or a CUDA index); whether that device is available is torch's to say."""
    if value is None or isinstance(value, torch.device):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"{name} must be a torch.device, a str, an int or None, got {type(value).__name__} "
                        f"({value!r})")
    try:
        torch.device(value)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{name} ({value!r}) is not a torch device, expected e.g. 'cpu', 'cuda' or 'cuda:0'") \
            from error
    return value


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} ({value}) must be an int >= {minimum}")
    return value


def check_tuple(name: str, value: object, dims: int, minimum: int = 1) -> tuple[int, ...]:
    """Turn an int or a sequence of ``dims`` ints into a tuple, like ``nn.Conv2d`` does."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        items = tuple(value)
        if len(items) != dims:
            raise ValueError(f"{name} ({value!r}) must be an int or a sequence of {dims} ints")
        for item in items:
            check_int(name, item, minimum)
        return items
    return (check_int(name, value, minimum),) * dims


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def centre_padding(kernel_size: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...]:
    """``dilation * (k // 2)`` per dimension: the padding that keeps the output on the input's grid
    (``nn.Conv2d``'s ``"same"`` for an odd kernel at stride 1), HetConv's default."""
    return tuple(d * (k // 2) for k, d in zip(kernel_size, dilation))


def check_padding(padding: object, kernel_size: tuple[int, ...], stride: tuple[int, ...],
                  dilation: tuple[int, ...]) -> tuple[int, ...]:
    """A HetConv layer's ``padding`` as a tuple of ints: ``None`` (the default) and ``"same"`` give
    ``dilation * (k // 2)``, ``"valid"`` gives 0, an int or a sequence is taken per dimension.

    Every value must lie in ``[0, dilation * (k // 2)]``: the 1 x 1 part reads the input at the k x k
    kernel's centre tap, which a larger padding would put outside the input. ``"same"`` needs
    stride 1, as ``nn.Conv2d`` demands (``padding=k // 2`` is the same padding at any stride).
    """
    dims = len(kernel_size)
    full = centre_padding(kernel_size, dilation)
    shown_full = full[0] if len(set(full)) == 1 else full
    if padding is None:
        return full
    if isinstance(padding, str):
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"padding='same' needs stride 1, as in nn.Conv2d (stride is {stride}); "
                                 f"padding={shown_full} (dilation * (kernel_size // 2)) keeps the centre taps "
                                 "aligned at any stride")
            return full
        if padding == "valid":
            return (0,) * dims
        raise ValueError(f"padding ({padding!r}) must be 'same', 'valid', an int or a sequence of {dims} ints")
    if isinstance(padding, bool) or not isinstance(padding, (int, tuple, list)):
        raise ValueError(f"padding ({padding!r}) must be 'same', 'valid', an int or a sequence of {dims} ints")
    value = check_tuple("padding", padding, dims, minimum=0)
    if any(p > f for p, f in zip(value, full)):
        raise ValueError(f"padding ({padding!r}) must be at most dilation * (kernel_size // 2) = {shown_full} per "
                         "dimension ('same'), or any smaller value down to 0 ('valid'): the 1x1 part reads the input "
                         "at the k x k kernel's centre tap, which a larger padding would put outside the input")
    return value


def check_padding_mode(padding_mode: object) -> str:
    """``padding_mode`` as ``nn.Conv2d`` takes it: one of :data:`PADDING_MODES`."""
    if not isinstance(padding_mode, str) or padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode ({padding_mode!r}) must be one of {PADDING_MODES}")
    return padding_mode


def check_odd(name: str, value: tuple[int, ...]) -> tuple[int, ...]:
    """Require every entry of a kernel size to be odd, so the kernel has a centre tap."""
    if any(k % 2 == 0 for k in value):
        shown = value[0] if len(set(value)) == 1 else value
        raise ValueError(
            f"{name} ({shown}) must be odd so that the k x k kernel has a centre tap "
            "for the 1x1 kernels to sit on"
        )
    return value


def check_input(input: object, in_channels: int | None, dims: int, who: str) -> None:
    """Check a layer's input: a tensor of rank ``dims + 2`` with ``in_channels`` channels
    (any number of channels when ``in_channels`` is None)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{who} expects input to be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != dims + 2:
        layout = "(batch, channels, height, width)" if dims == 2 else "(batch, channels, depth, height, width)"
        raise ValueError(
            f"{who} expects a {dims + 2}-D input {layout}, got a {input.dim()}-D input "
            f"of shape {tuple(input.shape)}"
        )
    if in_channels is not None and input.shape[1] != in_channels:
        raise ValueError(
            f"{who} expects input with {in_channels} channels (dim 1), got {input.shape[1]} "
            f"(input shape {tuple(input.shape)})"
        )


def import_object(spec: str, name: str) -> object:
    """The object ``spec`` names as ``"package.module:attribute"`` (``"pkg.mod:obj.attr"`` too), imported
    here; ``name`` is the argument it was given as, for the messages.

    Raises:
        ValueError: not of that form, a module that cannot be imported or an attribute it does not have.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{name} ({spec!r}) must be 'package.module:name'")
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{name} ({spec!r}): cannot import {module_name!r} ({error}); is its folder on the "
                         "Python path (PYTHONPATH)?") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{name} ({spec!r}): {getattr(target, '__name__', module_name)!r} has no attribute "
                             f"{part!r}")
        target = getattr(target, part)
    return target
