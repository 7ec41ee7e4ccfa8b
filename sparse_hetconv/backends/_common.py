"""What the stock-kernel backends share: the k x k part, small tensor-layout helpers, and the test
that says whether a call is an ordinary eager one (whose values may be read and cached)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..pattern import HetConvPattern

__all__ = ["CONV", "bf16_conv_is_wrong", "channels_last", "conv_kxk", "eager_tensor", "has_nonfinite",
           "kxk_part", "reduced_precision", "rows", "subsample"]

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def reduced_precision(input: Tensor) -> torch.dtype | None:
    """The reduced precision a CPU call on ``input`` computes in: bfloat16 or float16 inputs, or a
    float32 input under CPU autocast to one of them; None otherwise (and on other devices)."""
    if input.device.type != "cpu":
        return None
    if input.dtype in (torch.bfloat16, torch.float16):
        return input.dtype
    if input.dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return None


def bf16_conv_is_wrong(input: Tensor, stride: tuple[int, ...]) -> bool:
    """Whether oneDNN may compute this k x k convolution (k > 1) wrongly in bfloat16 on the CPU.

    Measured with torch 2.13 (stock ``F.conv2d`` / ``conv3d``, grouped or not, NCHW, channels-last
    or mixed, kernels 3 and 5, finite inputs): in 2-D, where a spatial dimension of the input is
    shorter than its stride, the weight gradient holds garbage (up to 1e37); in 3-D the output is
    garbage at depth 1 (up to 1e36, and the kernel writes out of bounds: later calls crash) and
    where a dimension is shorter than its stride, and weight gradients are off by up to 10x at
    other small sizes, so every 3-D one is routed. Float32 is exact in all of these. 1 x 1 feature
    maps at stride 2 are ordinary at the end of a CIFAR network.
    """
    if reduced_precision(input) != torch.bfloat16:
        return False
    sizes = tuple(input.shape[2:])
    if len(sizes) == 3:
        return True
    if not all(isinstance(n, int) for n in sizes):
        return False  # symbolic sizes (dynamic shapes under graph capture): no branch on them
    return any(n < s for n, s in zip(sizes, stride))


def conv_kxk(input: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, ...], padding: tuple[int, ...],
             groups: int) -> Tensor:
    """A (grouped) k x k convolution, in float32 where oneDNN gets it wrong in bfloat16
    (:func:`bf16_conv_is_wrong`). The output is then rounded to bfloat16, as a bfloat16 convolution
    (which accumulates in float32) rounds it; gradients reach the parameters in their own dtype."""
    conv = CONV[input.dim() - 2]
    if not bf16_conv_is_wrong(input, stride):
        return conv(input, weight, bias, stride, padding, 1, groups)
    with torch.autocast("cpu", enabled=False):
        out = conv(input.float(), weight.float(), None if bias is None else bias.float(), stride, padding, 1, groups)
    return out.to(torch.bfloat16)


def kxk_part(input: Tensor, weight_kxk: Tensor, bias: Tensor | None, stride: tuple[int, ...],
             pattern: HetConvPattern) -> Tensor:
    """The grouped k x k convolution (``groups = P``, padding ``k // 2``) with the bias."""
    return conv_kxk(input, weight_kxk, bias, stride, pattern.padding, pattern.part)


def eager_tensor(t: Tensor) -> bool:
    """Whether ``t`` is an ordinary tensor of an eager call, with a real storage address and values.

    False inside graph capture (``torch.compile``, ``torch.export``, ``torch.jit.trace``: what a
    call reads from a tensor's values or caches by its address would not be part of the graph), for
    tensor subclasses, on the meta device, for the wrapped tensors of ``torch.func`` transforms
    (``vmap``, ``grad``), under ``FakeTensorMode`` (shape propagation) and under
    ``FlopCounterMode`` (which counts the operators it sees).
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if type(t) is not Tensor and type(t) is not nn.Parameter or t.device.type == "meta":
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return False
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return False
    # FlopCounterMode counts the operators it sees: work done outside them would go uncounted.
    # (Other observing modes, such as a memory tracker, see the call's allocations, all operators.)
    if torch._C._len_torch_dispatch_stack():
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        return not any(type(mode).__module__ == "torch.utils.flop_counter" for mode in _get_current_dispatch_mode_stack())
    return True


def has_nonfinite(input: Tensor) -> bool:
    """Whether an eager CPU ``input`` holds an ``inf`` or ``NaN`` (docs/design.md §9).

    One sum, read on the host: a non-finite element makes it non-finite (``inf - inf`` is NaN too);
    finite values whose sum overflows also answer True, which only costs the caller its exact path.
    Always False where the answer would cost a device synchronisation (CUDA) or a graph break
    (graph capture), and for the tensors :func:`eager_tensor` rejects.
    """
    if input.device.type != "cpu" or not eager_tensor(input):
        return False
    if input.dtype == torch.float32 or input.dtype == torch.float64:
        total = input.detach().sum()
    elif input.dtype == torch.bfloat16 or input.dtype == torch.float16:
        total = input.detach().sum(dtype=torch.float32)  # a float16 sum would overflow at 65504
    else:
        return False
    return not math.isfinite(total.item())


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
