"""Running a module on a probe input without side effects: what the converters check with.

A converter must find out what a module computes without firing the user's hooks (a forward hook
may count calls, log or save activations) and without changing the module (a BatchNorm in
training mode would update its statistics). :func:`quiet_copy` gives a float64 copy of the module
with every hook of its subtree removed, and :func:`no_global_hooks` switches off the hooks
registered for all modules (``register_module_forward_hook``) while it runs. The copy is then
called as usual (``copy(x)``), so what runs is exactly the module's ``forward`` and those of its
children: calling ``module.forward(x)`` alone would skip only the module's own hooks, not its
children's.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

__all__ = ["CopyError", "FORWARD_HOOKS", "STATE_HOOKS", "hook_names", "no_global_hooks", "probe_extent", "probe_input", "quiet_copy",
           "relative_change", "silenced", "tolerance"]

# The hook dictionaries of an nn.Module (torch 2.x), by what they observe.
FORWARD_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                 "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
                 "_backward_hooks")
STATE_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
_GLOBAL = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_forward_hooks_with_kwargs",
           "_global_forward_hooks_always_called", "_global_backward_pre_hooks", "_global_backward_hooks")


_HOOK_KINDS = {"_forward_pre_hooks": "forward pre-hook", "_forward_hooks": "forward hook",
               "_backward_pre_hooks": "backward pre-hook", "_backward_hooks": "backward hook",
               "_state_dict_hooks": "state_dict hook", "_state_dict_pre_hooks": "state_dict pre-hook",
               "_load_state_dict_pre_hooks": "load_state_dict pre-hook",
               "_load_state_dict_post_hooks": "load_state_dict post-hook"}


def hook_names(module: nn.Module, state: bool = True) -> list[str]:
    """The kinds of hook registered on ``module`` itself (not its children), e.g.
    ``["forward hook"]``; ``state=False`` leaves out the state_dict hooks."""
    return [kind for name, kind in _HOOK_KINDS.items()
            if getattr(module, name, None) and (state or "state_dict" not in kind)]


def _strip_hooks(module: nn.Module) -> None:
    for sub in module.modules():
        for name in FORWARD_HOOKS + STATE_HOOKS:
            if isinstance(getattr(sub, name, None), dict):
                setattr(sub, name, OrderedDict())
        if hasattr(sub, "_is_full_backward_hook"):
            sub._is_full_backward_hook = None


class CopyError(ValueError):
    """A module that cannot be copied for a test run (the converters add its path)."""


def quiet_copy(module: nn.Module, dtype: torch.dtype | None = torch.float64, finite: bool = False) -> nn.Module:
    """A deep copy of ``module`` without any hook in its subtree, its floating tensors in ``dtype``
    (None keeps them), in eval mode. The original is not touched.

    With ``finite`` every inf or NaN in the copy's parameters and buffers is replaced by zero, for
    probes that ask about structure only (which children a forward adds up).

    Raises:
        CopyError (a ValueError): torch cannot copy it (e.g. under the old ``weight_norm``).
    """
    try:
        clone = copy.deepcopy(module)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CopyError(f"cannot be copied for a test run ({first}); if it uses torch.nn.utils.weight_norm, "
                        "remove it first (torch.nn.utils.remove_weight_norm)") from error
    _strip_hooks(clone)
    if dtype is not None:
        clone = clone.to(dtype)
    if finite:
        with torch.no_grad():
            for tensor in list(clone.parameters()) + list(clone.buffers()):
                if tensor.is_floating_point():
                    tensor.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return clone.eval()


@contextlib.contextmanager
def no_global_hooks():
    """Switch off the hooks registered for every module while the block runs (restored after)."""
    saved = {}
    for name in _GLOBAL:
        hooks = getattr(_module, name, None)
        if isinstance(hooks, dict) and hooks:
            saved[name] = OrderedDict(hooks)
            hooks.clear()
    try:
        yield
    finally:
        for name, hooks in saved.items():
            getattr(_module, name).update(hooks)


@contextlib.contextmanager
def silenced(model: nn.Module):
    """Detach the forward and backward hooks of every module of ``model`` while the block runs
    (``torch.fx`` tracing calls modules through ``nn.Module.__call__``, which would run them on
    proxies); they are put back, unchanged, afterwards."""
    saved = []
    for module in model.modules():
        hooks = {name: getattr(module, name) for name in FORWARD_HOOKS if getattr(module, name, None)}
        for name in hooks:
            setattr(module, name, OrderedDict())
        saved.append((module, hooks))
    try:
        yield
    finally:
        for module, hooks in saved:
            for name, value in hooks.items():
                setattr(module, name, value)


def probe_extent(module) -> tuple[int, ...]:
    """The span of ``module``'s kernel, ``dilation * (k - 1) + 1`` per dimension (its
    ``kernel_size`` without dilation; ``(1,)`` without one): what :func:`probe_input` sizes for."""
    kernel = tuple(getattr(module, "kernel_size", (1,)))
    dilation = tuple(getattr(module, "dilation", None) or (1,) * len(kernel))
    return tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))


def probe_input(channels: int, kernel_size: tuple[int, ...], device=None, seed: int = 0, batch: int = 1) -> Tensor:
    """A random float64 input ``(batch, channels, 2k+1, ...)``: every output pixel class (interior,
    edges, corners) occurs, and at stride 2 the output is still larger than one pixel."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    size = tuple(2 * k + 1 for k in kernel_size)
    return torch.randn((batch, channels) + size, generator=generator, dtype=torch.float64).to(device)


def relative_change(new: Tensor, old: Tensor) -> float:
    """``||new - old|| / ||old||`` (Frobenius); 0.0 when both are zero, inf when only ``old`` is.

    Entries where ``old`` is not finite (a non-finite weight of the source) are left out; a
    non-finite ``new`` where ``old`` is finite counts as an infinite change. A converted layer may
    give a finite value where the source gave NaN: docs/design.md §9 (a masked-out weight is not
    part of the layer's function, whatever it holds).
    """
    new, old = new.double(), old.double()
    finite = torch.isfinite(old)
    if not bool(torch.isfinite(new[finite]).all()):
        return float("inf")
    new, old = new[finite], old[finite]
    diff = float(torch.linalg.vector_norm(new - old))
    scale = float(torch.linalg.vector_norm(old))
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def tolerance(dtype: torch.dtype) -> float:
    """The relative output change that still counts as exact for weights stored in ``dtype``: a few
    roundings of the stored weights (folded centre taps, summed biases), far below what a wrong
    pattern gives (of order 1)."""
    if not dtype.is_floating_point:
        return 1e-12
    return max(1e-12, 8 * torch.finfo(dtype).eps)
