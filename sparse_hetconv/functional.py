"""The HetConv operation as pure functions, and the backends that compute its 1 x 1 part.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. The k x k part is a grouped
convolution (``groups = P``) with padding ``k // 2``; the 1 x 1 part multiplies the compact values
``weight_1x1`` (``N x (M - M/P)``, DESIGN section 3) with the input sampled at the same stride.
Every backend computes the same numbers; they differ only in speed:

* ``dense``: scatter the values into a zero ``N x M`` matrix and run one 1 x 1 convolution.
* ``blocked``: per group, two matrix products over the contiguous channel slices before and
  after the group's block; no zero is ever multiplied.
* ``torch_sparse``: the literal ``torch.sparse`` CSR matrix times the input, through a custom
  autograd function whose backward computes only the existing kernels' gradients.

:class:`sparse_hetconv.SparseHetConv2d` wraps :func:`het_conv2d`.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_input
from .pattern import HetConvPattern

__all__ = ["BACKENDS", "het_conv", "het_conv2d", "het_conv3d", "select_backend"]

BACKENDS = ("auto", "dense", "blocked", "torch_sparse")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def select_backend(pattern: HetConvPattern, input: Tensor | None = None, training: bool | None = None) -> str:
    """The backend ``"auto"`` resolves to for a layer of this pattern and this input.

    The choice depends only on (shape, part, device, dtype, memory format, training), so it is
    deterministic and cheap. ``dense`` runs the stock 1 x 1 convolution kernels, which are the
    fastest route on most shapes (it is the masked form's own cost); the per-group ``blocked``
    products win only where the groups are few and wide.
    """
    from .autotune import choose

    return choose(pattern, input, training)


def _subsample(input: Tensor, stride: tuple[int, ...]) -> Tensor:
    if all(s == 1 for s in stride):
        return input
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)
    return input[index]


def _one_by_one_dense(input: Tensor, weight_1x1: Tensor, pattern: HetConvPattern, stride) -> Tensor:
    weight = pattern.scatter_1x1(weight_1x1)
    weight = weight.view(weight.shape + (1,) * pattern.dims)
    return _CONV[pattern.dims](input, weight, None, stride)


def _channels_last(x: Tensor) -> bool:
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    return False


def _one_by_one_blocked(input: Tensor, weight_1x1: Tensor, pattern: HetConvPattern, stride) -> Tensor:
    x = _subsample(input, stride)
    batch, spatial = x.shape[0], x.shape[2:]
    p, n, m = pattern.part, pattern.block_out, pattern.block_in
    values = weight_1x1.view(p, n, pattern.num_1x1)
    if _channels_last(x):
        # (B, L, M) view of a channels-last tensor: channel slices are column blocks.
        rows = x.movedim(1, -1).reshape(batch, math.prod(spatial), pattern.in_channels)
        parts = [_group_sum(rows[..., :g * m], rows[..., (g + 1) * m:], values[g].t(), g * m, right=True)
                 for g in range(p)]
        return torch.cat(parts, dim=-1).view(batch, *spatial, pattern.out_channels).movedim(-1, 1)
    cols = x.reshape(batch, pattern.in_channels, math.prod(spatial))
    parts = [_group_sum(cols[:, :g * m], cols[:, (g + 1) * m:], values[g], g * m, right=False)
             for g in range(p)]
    return torch.cat(parts, dim=1).view(batch, pattern.out_channels, *spatial)


def _group_sum(before: Tensor, after: Tensor, values: Tensor, split: int, right: bool) -> Tensor:
    """One group's 1 x 1 output from the channel slices before and after its block.

    ``values`` is the group's ``(n, M - m)`` block (or its transpose when ``right``); its first
    ``split`` columns (rows) belong to the channels before the block, the rest to those after.
    """
    terms = []
    if before.shape[-1 if right else -2]:
        terms.append(before @ values[:split] if right else values[:, :split] @ before)
    if after.shape[-1 if right else -2]:
        terms.append(after @ values[split:] if right else values[:, split:] @ after)
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values.reshape(-1), size=shape, check_invariants=False)


class _CsrMatmul(torch.autograd.Function):
    """``y = W x`` with ``W`` the HetConv 1 x 1 pattern as a torch.sparse CSR matrix.

    Building the CSR tensor inside the function sidesteps PyTorch issue #98929 (a CSR tensor made
    from a parameter does not carry its gradient back); the backward returns the gradient of the
    compact values only, computed by a sampled product on the pattern (no N x M dense gradient).
    """

    @staticmethod
    def forward(values: Tensor, cols: Tensor, crow: Tensor, col: Tensor, shape: tuple[int, int]) -> Tensor:
        matrix = _csr(crow, col, values, shape)
        return matrix @ cols

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        values, cols, crow, col, shape = inputs
        ctx.save_for_backward(values, cols, crow, col)
        ctx.shape = shape

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, cols, crow, col = ctx.saved_tensors
        grad_values = grad_cols = None
        matrix = _csr(crow, col, values, ctx.shape)
        if ctx.needs_input_grad[1]:
            grad_cols = (grad.t() @ matrix).t()
        if ctx.needs_input_grad[0]:
            # zeros, not empty: sampled_addmm reads the template even with beta=0 (NaN otherwise)
            template = _csr(crow, col, torch.zeros_like(values), ctx.shape)
            sampled = torch.sparse.sampled_addmm(template, grad.contiguous(), cols.t().contiguous(), beta=0.0)
            grad_values = sampled.values().view_as(values)
        return grad_values, grad_cols, None, None, None


def _one_by_one_torch_sparse(input: Tensor, weight_1x1: Tensor, pattern: HetConvPattern, stride) -> Tensor:
    x = _subsample(input, stride)
    batch, spatial = x.shape[0], x.shape[2:]
    # MKL's sparse kernels on the CPU have no half-precision path: compute those in float32.
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    cols = x.movedim(1, 0).reshape(pattern.in_channels, batch * math.prod(spatial)).to(compute)
    values = weight_1x1.to(compute)
    if cols.shape[1] == 0:
        y = cols.new_zeros((pattern.out_channels, 0)) + 0 * values.sum()
    else:
        shape = (pattern.out_channels, pattern.in_channels)
        y = _CsrMatmul.apply(values, cols, pattern.crow_indices(x.device), pattern.col_indices(x.device), shape)
    y = y.to(x.dtype).view(pattern.out_channels, batch, *spatial).movedim(0, 1)
    return y


_ONE_BY_ONE = {
    "dense": _one_by_one_dense,
    "blocked": _one_by_one_blocked,
    "torch_sparse": _one_by_one_torch_sparse,
}


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
        backend (str): ``"auto"``, ``"dense"``, ``"blocked"`` or ``"torch_sparse"``; all exact.
        pattern (HetConvPattern, optional): a prebuilt pattern for these shapes (skips checks).

    Returns:
        Tensor[batch, out_channels, *out_spatial]: with ``out = floor((size - 1) / stride) + 1``.

    Raises:
        ValueError: a shape, part or backend that does not fit.
    """
    dims = weight_kxk.dim() - 2
    if pattern is None:
        if backend not in BACKENDS:
            raise ValueError(f"backend ({backend!r}) must be one of {BACKENDS}")
        check_input(input, None, dims, "het_conv")
        pattern = HetConvPattern(input.shape[1], weight_kxk.shape[0], part, tuple(weight_kxk.shape[2:]), dims)
        _check_weights(pattern, weight_kxk, weight_1x1, bias)
    stride = (stride,) * dims if isinstance(stride, int) else tuple(stride)
    out = _CONV[dims](input, weight_kxk, bias, stride, pattern.padding, 1, pattern.part)
    if pattern.part == 1:
        return out
    if backend == "auto":
        backend = select_backend(pattern, input, torch.is_grad_enabled() and weight_1x1.requires_grad)
    return out + _ONE_BY_ONE[backend](input, weight_1x1, pattern, stride)


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
