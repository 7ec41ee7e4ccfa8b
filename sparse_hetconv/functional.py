"""The HetConv operation as pure functions: ``het_conv2d`` and ``het_conv3d``.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. A filter over ``M`` input
channels has ``M/P`` k x k kernels (a grouped convolution, ``groups = P``, padding ``k // 2``) and
``M - M/P`` 1 x 1 kernels, stored compactly as ``weight_1x1`` (``N x (M - M/P)``, row ``j`` in
increasing channel order; docs/design.md §3). This module checks the arguments, resolves the
backend (``"auto"`` in exactly one place, :func:`resolve_backend`) and hands a concrete backend of
:mod:`sparse_hetconv.backends` the call. :class:`sparse_hetconv.SparseHetConv2d` wraps
:func:`het_conv2d`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import autotune
from ._checks import check_input, check_tuple
from .backends import BACKENDS, check_backend, fused, get
from .backends._common import has_nonfinite, kxk_part, reduced_precision
from .pattern import HetConvPattern

__all__ = ["BACKENDS", "het_conv", "het_conv2d", "het_conv3d", "needs_grad", "resolve_backend"]


def needs_grad(input: Tensor, *weights: Tensor | None) -> bool:
    """Whether autograd will record a call on these tensors (the ``training`` of :mod:`autotune`)."""
    if not torch.is_grad_enabled():
        return False
    return input.requires_grad or any(w is not None and w.requires_grad for w in weights)


def resolve_backend(backend: str, pattern: HetConvPattern, input: Tensor | None, grad: bool,
                    stride: tuple[int, ...] | None = None, weights: tuple = ()) -> str:
    """The concrete backend a call uses: ``backend`` itself, or what ``"auto"`` resolves to.

    The one place ``"auto"`` is resolved (:func:`sparse_hetconv.autotune.choose`); the layers and
    :func:`het_conv` call it once per call. A call the ``fused`` kernel does not compute (see
    :func:`sparse_hetconv.backends.fused.runs`; ``weights``: the call's parameter tensors) resolves
    to ``blocked``, which computes it in its own precision.
    """
    if backend == "auto":
        backend = autotune.choose(pattern, input, grad, stride, weights) if pattern.part > 1 else "dense"
    if backend == "fused" and pattern.part > 1 and input is not None and not fused.runs(input, weights, pattern):
        return "blocked"
    return backend


def _het_conv(input: Tensor, weight_kxk: Tensor, weight_1x1: Tensor | None, bias: Tensor | None,
              stride: tuple[int, ...], pattern: HetConvPattern, backend: str, grad: bool) -> Tensor:
    """:func:`het_conv` without argument checks; ``backend`` is concrete.

    A reduced-precision CPU call whose input holds ``inf`` or NaN is computed in float32 and rounded
    to its precision: oneDNN's bfloat16 kernels put NaN where the definition has none there (they
    multiply padding and partial tiles with the input; measured with torch 2.13 for inputs of up to
    five pixels along a dimension, forward and weight gradient), and float32 is exact
    (docs/design.md §9).
    """
    low = reduced_precision(input)
    # One sum of the input per call, read by the precision route and by ``dense`` (which must not
    # multiply its stored zeros by an inf); the other backends never multiply a missing kernel.
    dense_1x1 = backend == "dense" and pattern.part > 1
    nonfinite = (low is not None or dense_1x1) and has_nonfinite(input)
    if low is not None and nonfinite:
        single = [None if t is None else t.float() for t in (weight_kxk, weight_1x1, bias)]
        with torch.autocast("cpu", enabled=False):
            out = _het_conv(input.float(), *single, stride, pattern, "blocked" if dense_1x1 else backend, grad)
        return out.to(low)
    if pattern.part == 1:
        return kxk_part(input, weight_kxk, bias, stride, pattern)
    if dense_1x1:
        return get(backend)(input, weight_kxk, weight_1x1, bias, stride, pattern, grad, nonfinite=nonfinite)
    return get(backend)(input, weight_kxk, weight_1x1, bias, stride, pattern, grad)


def het_conv(
    input: Tensor,
    weight_kxk: Tensor,
    weight_1x1: Tensor | None,
    bias: Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    part: int = 1,
    backend: str = "dense",
    pattern: HetConvPattern | None = None,
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

    Returns:
        Tensor[batch, out_channels, *out_spatial]: with ``out = floor((size - 1) / stride) + 1``,
        in the memory format the k x k convolution produces (channels-last in, channels-last out).

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
    else:
        stride = (stride,) * dims if isinstance(stride, int) else tuple(stride)
    grad = needs_grad(input, weight_kxk, weight_1x1, bias)
    backend = resolve_backend(backend, pattern, input, grad, stride, (weight_kxk, weight_1x1, bias))
    return _het_conv(input, weight_kxk, weight_1x1, bias, stride, pattern, backend, grad)


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


def het_conv2d(input, weight_kxk, weight_1x1, bias=None, stride=1, part=1, backend="dense") -> Tensor:
    """2-D :func:`het_conv`; ``input`` is ``Tensor[batch, in_channels, height, width]``."""
    if weight_kxk.dim() != 4:
        raise ValueError(f"het_conv2d expects a 4-D weight_kxk, got shape {tuple(weight_kxk.shape)}")
    return het_conv(input, weight_kxk, weight_1x1, bias, stride, part, backend)


def het_conv3d(input, weight_kxk, weight_1x1, bias=None, stride=1, part=1, backend="dense") -> Tensor:
    """3-D :func:`het_conv`; ``input`` is ``Tensor[batch, in_channels, depth, height, width]``."""
    if weight_kxk.dim() != 5:
        raise ValueError(f"het_conv3d expects a 5-D weight_kxk, got shape {tuple(weight_kxk.shape)}")
    return het_conv(input, weight_kxk, weight_1x1, bias, stride, part, backend)


def __getattr__(name: str):
    if name == "select_backend":  # 0.1 name of autotune.choose
        warnings.warn("sparse_hetconv.functional.select_backend is deprecated; use sparse_hetconv.autotune.choose",
                      DeprecationWarning, stacklevel=2)
        return autotune.choose
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
