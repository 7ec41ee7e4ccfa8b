"""What the backends share: the :class:`Call` they are handed, the k x k part, the input at the
centre taps, small tensor-layout helpers, and the one test of whether a call is an ordinary eager
one (:func:`eager_tensor`: whose values may be read, whose outputs may be written in place)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.stock import bf16_conv_is_wrong, reduced_precision
from ..pattern import HetConvPattern

__all__ = ["CONV", "Call", "bf16_conv_is_wrong", "centre", "centre_origin", "channels_last", "conv_kxk", "crop",
           "eager_call", "eager_tensor", "has_nonfinite", "kxk_part", "onnx_export", "reduced_precision", "rows",
           "transformed"]


@dataclass(frozen=True)
class Call:
    """One call of a HetConv layer as a backend sees it, beside its tensors: the geometry, and what
    the dispatcher (:func:`sparse_hetconv.functional.dispatch`) found out about it, once.

    Attributes:
        pattern (HetConvPattern): the layer's kernels.
        stride, padding, dilation (tuple of int): of the k x k part, per spatial dimension
            (``0 <= padding <= dilation * (k // 2)``); the 1 x 1 part reads the input at the
            k x k kernels' centre tap, at the same stride.
        grad (bool): autograd records the call.
        eager (bool): the tensors are ordinary eager ones (:func:`eager_tensor`): their values and
            memory layout may be read and outputs written in place.
        nonfinite (bool): the input holds ``inf`` or NaN (only known for eager CPU calls).
    """

    pattern: HetConvPattern
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    grad: bool = False
    eager: bool = True
    nonfinite: bool = False

    @classmethod
    def of(cls, pattern: HetConvPattern, stride=None, padding=None, dilation=None, **flags) -> "Call":
        """A call with the defaults filled in: stride and dilation 1, padding ``dilation * (k // 2)``."""
        dims = pattern.dims
        stride = (1,) * dims if stride is None else tuple(stride)
        dilation = (1,) * dims if dilation is None else tuple(dilation)
        if padding is None:
            padding = tuple(d * (k // 2) for d, k in zip(dilation, pattern.kernel_size))
        return cls(pattern, stride, tuple(padding), dilation, **flags)

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_kxk(input: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, ...], padding: tuple[int, ...],
             groups: int, dilation: tuple[int, ...] | int = 1) -> Tensor:
    """A (grouped) k x k convolution, in float32 where oneDNN gets it wrong in bfloat16
    (:func:`bf16_conv_is_wrong`). The output is then rounded to bfloat16, as a bfloat16 convolution
    (which accumulates in float32) rounds it; gradients reach the parameters in their own dtype."""
    conv = CONV[input.dim() - 2]
    if not bf16_conv_is_wrong(input, stride):
        return conv(input, weight, bias, stride, padding, dilation, groups)
    with torch.autocast("cpu", enabled=False):
        out = conv(input.float(), weight.float(), None if bias is None else bias.float(), stride, padding, dilation,
                   groups)
    return out.to(torch.bfloat16)


def kxk_part(input: Tensor, weight_kxk: Tensor, bias: Tensor | None, call: Call) -> Tensor:
    """The grouped k x k convolution (``groups = P``) with the bias."""
    return conv_kxk(input, weight_kxk, bias, call.stride, call.padding, call.pattern.part, call.dilation)


def centre_origin(input: Tensor, call: Call) -> Tensor:
    """``input`` from the first output pixel's centre tap on (a view; ``input`` itself when the
    padding is ``dilation * (k // 2)``): a 1 x 1 convolution at the call's stride reads it where the
    layer's 1 x 1 part does (its output may be longer than the layer's: :func:`crop`)."""
    offsets = [d * (k // 2) - p for d, k, p in zip(call.dilation, call.pattern.kernel_size, call.padding)]
    if not any(offsets):
        return input
    return input[(slice(None), slice(None)) + tuple(slice(o, None) for o in offsets)]


def crop(y: Tensor, size) -> Tensor:
    """``y``'s leading ``size`` pixels along each spatial dimension (``y`` itself when they are all)."""
    if tuple(y.shape[2:]) == tuple(size):
        return y
    return y[(slice(None), slice(None)) + tuple(slice(0, n) for n in size)]


def centre(input: Tensor, out: Tensor, call: Call) -> Tensor:
    """The input at the centre taps of ``out``'s pixels: what the 1 x 1 part reads (a view)."""
    x = centre_origin(input, call)
    if any(s != 1 for s in call.stride):
        x = x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in call.stride)]
    return crop(x, out.shape[2:])


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


def transformed() -> bool:
    """Whether the call runs inside a ``torch.func`` transform (``vmap``, ``grad``, ...) in eager mode
    (graph capture traces the transforms itself)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is not None


def onnx_export() -> bool:
    """Whether ``torch.onnx.export`` is tracing the call (it has no translation of the registered
    operator: the layers give it their stock form)."""
    onnx = sys.modules.get("torch.onnx")  # (not imported: surely not exporting; importing it is slow)
    return onnx is not None and onnx.is_in_onnx_export()


def eager_call(*tensors: Tensor | None) -> bool:
    """Whether a call on these tensors is an ordinary eager one: every tensor passes
    :func:`eager_tensor` and no ``torch.func`` transform is active (whose wrapped weights may not be
    among the tensors asked about)."""
    return not transformed() and all(eager_tensor(t) for t in tensors if t is not None)


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


def channels_last(x: Tensor) -> bool:
    """Whether a 4-D (5-D) tensor is channels-last and not also contiguous NC(D)HW (ask it of an
    eager call's tensors only: ``vmap``'s cannot answer)."""
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
