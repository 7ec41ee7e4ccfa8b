"""What the stock-kernel backends share: the k x k part, small tensor-layout helpers, and the test
that says whether a call is an ordinary eager one (whose values may be read and cached)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..pattern import HetConvPattern

__all__ = ["CONV", "channels_last", "eager_tensor", "kxk_part", "rows", "subsample"]

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def kxk_part(input: Tensor, weight_kxk: Tensor, bias: Tensor | None, stride: tuple[int, ...],
             pattern: HetConvPattern) -> Tensor:
    """The grouped k x k convolution (``groups = P``, padding ``k // 2``) with the bias."""
    return CONV[pattern.dims](input, weight_kxk, bias, stride, pattern.padding, 1, pattern.part)


def eager_tensor(t: Tensor) -> bool:
    """Whether ``t`` is an ordinary tensor of an eager call, with a real storage address and values.

    False inside graph capture (``torch.compile``, ``torch.export``, ``torch.jit.trace``: what a
    call reads from a tensor's values or caches by its address would not be part of the graph), for
    tensor subclasses and fake tensors (``FakeTensorMode``, shape propagation), on the meta device,
    and for the wrapped tensors of ``torch.func`` transforms (``vmap``, ``grad``).
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if type(t) is not Tensor and type(t) is not nn.Parameter or t.device.type == "meta":
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return False
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None


def subsample(input: Tensor, stride: tuple[int, ...]) -> Tensor:
    """The input at the positions a strided 1 x 1 convolution reads (a view)."""
    if all(s == 1 for s in stride):
        return input
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)
    return input[index]


def channels_last(x: Tensor) -> bool:
    """Whether a 4-D (5-D) tensor is channels-last and not also contiguous NC(D)HW.

    False for the wrapped tensors of ``torch.func`` transforms (``vmap`` cannot answer the question;
    every backend has a path that does not ask it).
    """
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(x):
        return False  # (dynamo traces vmap itself, and cannot call this function)
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    return False


def rows(x: Tensor) -> Tensor | None:
    """``(pixels, channels)`` view of a channels-last (or single-pixel) tensor, else None."""
    if x.dim() not in (4, 5):
        return None
    if channels_last(x) or x.is_contiguous() and math.prod(x.shape[2:]) == 1:
        moved = x.movedim(1, -1)
        return moved.view(-1, x.shape[1]) if moved.is_contiguous() else None
    return None
