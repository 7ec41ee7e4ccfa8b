"""The HetConv operation as pure functions, ``het_conv2d`` and ``het_conv3d``, and the one place a
call is dispatched to a backend (:func:`dispatch`).

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. A filter over ``M`` input
channels has ``M/P`` k x k kernels (a grouped convolution, ``groups = P``) and ``M - M/P`` 1 x 1
kernels that read the input at the k x k kernels' centre tap, stored compactly as ``weight_1x1``
(``N x (M - M/P)``, row ``j`` in increasing channel order; docs/design.md §3). This module checks
the arguments, describes the call once (:class:`~sparse_hetconv.backends.Call`: geometry, whether
autograd records it, whether its tensors are ordinary eager ones), resolves the backend (``"auto"``
through :func:`sparse_hetconv.autotune.choose`) and hands the concrete backend of
:mod:`sparse_hetconv.backends` the call. :class:`sparse_hetconv.SparseHetConv2d` wraps it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from . import autotune
from ._checks import check_input, check_tuple
from .backends import BACKENDS, Call, check_backend, get
from .backends._common import eager_call, has_nonfinite, kxk_part, onnx_export, reduced_precision, transformed
from .pattern import HetConvPattern

__all__ = ["BACKENDS", "dispatch", "het_conv", "het_conv2d", "het_conv3d", "needs_grad", "resolve_backend"]


def needs_grad(input: Tensor, *weights: Tensor | None) -> bool:
    """Whether autograd will record a call on these tensors (the ``training`` of :mod:`autotune`)."""
    if not torch.is_grad_enabled():
        return False
    return input.requires_grad or any(w is not None and w.requires_grad for w in weights)


def resolve_backend(backend: str, call: Call, input: Tensor | None, weights: tuple = ()) -> str:
    """The concrete backend a call uses: ``backend`` itself, or what ``"auto"`` resolves to.

    ``fused`` and ``triton`` (the registered operator) take 2-D calls outside ``torch.func``
    transforms (custom operators have no rule for ``torch.func.grad``; ``vmap`` alone would work,
    but the choice is kept simple); other calls resolve to ``blocked``, which computes them in their
    own precision; so do ``torch_sparse`` calls inside a ``torch.func`` transform (a CSR tensor
    cannot hold its wrapped values). Under ``torch.onnx.export``, which has no translation of the operator, they
    resolve to ``dense``.
    """
    pattern = call.pattern
    if pattern.part == 1:
        return "dense"
    if backend == "auto":
        backend = autotune.choose(pattern, input, call.grad, call.stride, weights, padding=call.padding,
                                  dilation=call.dilation)
    if backend in ("fused", "triton"):
        if onnx_export():
            return "dense"  # ONNX has no translation of the operator; dense is a pair of convolutions
        if pattern.dims != 2 or transformed():
            return "blocked"
    if backend == "torch_sparse" and transformed():
        return "blocked"  # torch.func's wrapped tensors cannot become a CSR tensor's values
    if backend == "torch_sparse" and torch.compiler.is_exporting():
        raise ValueError(
            "backend 'torch_sparse' cannot be exported: torch.export does not trace torch.sparse CSR "
            "tensors; set the layers' backend to 'dense', 'grouped' or 'blocked' (the same numbers) first")
    return backend


def dispatch(input: Tensor, weight_kxk: Tensor, weight_1x1: Tensor | None, bias: Tensor | None,
             pattern: HetConvPattern, backend: str, stride, padding=None, dilation=None) -> tuple[Tensor, str]:
    """Compute a checked call with ``backend`` (``"auto"`` or concrete): the output and the concrete
    backend that computed it. The one place a call is described and sent to a backend.

    A reduced-precision CPU call whose input holds ``inf`` or NaN is computed in float32 and rounded
    to its precision: oneDNN's bfloat16 kernels put NaN where the definition has none there (they
    multiply padding and partial tiles with the input; measured with torch 2.13 for inputs of up to
    five pixels along a dimension, forward and weight gradient), and float32 is exact
    (docs/design.md §9). ``dense`` reads the same sum: it must not multiply its stored zeros by an
    ``inf``.
    """
    weights = (weight_kxk, weight_1x1, bias)
    if input.dtype != weight_kxk.dtype and not torch.is_autocast_enabled(input.device.type):
        raise ValueError(f"input has dtype {input.dtype}, expected the weights' dtype ({weight_kxk.dtype}); "
                         "convert one of them, or run the call under torch.autocast")
    call = Call.of(pattern, stride, padding, dilation, grad=needs_grad(input, *weights),
                   eager=eager_call(input, *weights))
    name = resolve_backend(backend, call, input, weights)
    low = reduced_precision(input)
    if (low is not None or name == "dense" and pattern.part > 1) and has_nonfinite(input):
        if low is not None:
            single = [None if t is None else t.float() for t in weights]
            with torch.autocast("cpu", enabled=False):
                out, name = dispatch(input.float(), *single, pattern, "blocked" if name == "dense" else name,
                                     call.stride, call.padding, call.dilation)
            return out.to(low), name
        call = dataclasses.replace(call, nonfinite=True)
    if pattern.part == 1:
        return kxk_part(input, weight_kxk, bias, call), name
    return get(name)(input, weight_kxk, weight_1x1, bias, call), name


def het_conv(
    input: Tensor,
    weight_kxk: Tensor,
    weight_1x1: Tensor | None,
    bias: Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    part: int = 1,
    backend: str = "dense",
    pattern: HetConvPattern | None = None,
    dilation: int | tuple[int, ...] = 1,
) -> Tensor:
    """Heterogeneous-kernel convolution in 2-D or 3-D (the dimension follows ``weight_kxk``).

    Args:
        input (Tensor[batch, in_channels, *spatial]): the input, NC(D)HW or channels-last.
        weight_kxk (Tensor[out_channels, in_channels / part, *kernel_size]): the grouped k x k
            kernels; filter ``j`` applies row ``j`` to the input channels of its block.
        weight_1x1 (Tensor[out_channels, in_channels - in_channels / part]): the compact 1 x 1
            values, row ``j`` in increasing channel order; ``None`` when ``part == 1``.
        bias (Tensor[out_channels], optional): added to every output pixel.
        stride (int or tuple): the stride of both parts.
        part (int): ``P``; ``in_channels`` and ``out_channels`` must be divisible by it.
        backend (str): one of :data:`BACKENDS` (``"auto"`` or a backend of
            :mod:`sparse_hetconv.backends`); all exact.
        pattern (HetConvPattern, optional): a prebuilt pattern for these shapes (skips checks).
        dilation (int or tuple): of the k x k kernels; the padding is ``dilation * (k // 2)``.

    Returns:
        Tensor[batch, out_channels, *out_spatial]: with ``out = floor((size - 1) / stride) + 1``.

    Raises:
        ValueError: a shape, part or backend that does not fit.

    Example:
        >>> x = torch.randn(2, 8, 5, 5)
        >>> het_conv2d(x, torch.randn(4, 4, 3, 3), torch.randn(4, 4), part=2).shape
        torch.Size([2, 4, 5, 5])
    """
    dims = weight_kxk.dim() - 2
    if pattern is None:
        check_backend(backend)
        if not isinstance(input, Tensor) or input.dim() != dims + 2:
            check_input(input, 0, dims, "het_conv")  # raises the type or rank error first
        # int(): under torch.jit.trace sizes are traced tensors, which the pattern's checks reject.
        pattern = HetConvPattern(int(input.shape[1]) if input.dim() > 1 else 0, int(weight_kxk.shape[0]), part,
                                 tuple(int(k) for k in weight_kxk.shape[2:]), dims)
        _check_weights(pattern, weight_kxk, weight_1x1, bias)
        check_input(input, pattern.in_channels, dims, "het_conv")
    stride = check_tuple("stride", stride, dims)
    dilation = check_tuple("dilation", dilation, dims)
    return dispatch(input, weight_kxk, weight_1x1, bias, pattern, backend, stride, dilation=dilation)[0]


def _check_weights(pattern: HetConvPattern, weight_kxk: Tensor, weight_1x1: Tensor | None, bias: Tensor | None) -> None:
    expected = (pattern.out_channels, pattern.block_in) + pattern.kernel_size
    if tuple(weight_kxk.shape) != expected:
        raise ValueError(f"weight_kxk has shape {tuple(weight_kxk.shape)}, expected {expected} for {pattern}")
    if pattern.part == 1:
        if weight_1x1 is not None and weight_1x1.numel():
            raise ValueError("weight_1x1 must be None (or empty) when part is 1: there is no 1x1 part")
    else:
        expected = (pattern.out_channels, pattern.num_1x1)
        if weight_1x1 is None or tuple(weight_1x1.shape) != expected:
            shape = None if weight_1x1 is None else tuple(weight_1x1.shape)
            raise ValueError(f"weight_1x1 has shape {shape}, expected {expected} for {pattern}")
    if bias is not None and tuple(bias.shape) != (pattern.out_channels,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({pattern.out_channels},)")
    for name, t in (("weight_1x1", weight_1x1), ("bias", bias)):
        if t is not None and t.dtype != weight_kxk.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, expected weight_kxk's dtype ({weight_kxk.dtype})")


def het_conv2d(input, weight_kxk, weight_1x1, bias=None, stride=1, part=1, backend="dense", dilation=1) -> Tensor:
    """2-D :func:`het_conv`; ``input`` is ``Tensor[batch, in_channels, height, width]``."""
    if weight_kxk.dim() != 4:
        raise ValueError(f"het_conv2d expects a 4-D weight_kxk, got shape {tuple(weight_kxk.shape)}")
    return het_conv(input, weight_kxk, weight_1x1, bias, stride, part, backend, dilation=dilation)


def het_conv3d(input, weight_kxk, weight_1x1, bias=None, stride=1, part=1, backend="dense", dilation=1) -> Tensor:
    """3-D :func:`het_conv`; ``input`` is ``Tensor[batch, in_channels, depth, height, width]``."""
    if weight_kxk.dim() != 5:
        raise ValueError(f"het_conv3d expects a 5-D weight_kxk, got shape {tuple(weight_kxk.shape)}")
    return het_conv(input, weight_kxk, weight_1x1, bias, stride, part, backend, dilation=dilation)
