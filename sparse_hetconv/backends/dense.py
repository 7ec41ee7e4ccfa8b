"""``dense``: the compact values scattered into a zero ``N x M`` matrix, one 1 x 1 convolution.

The masked form's own kernel, so never meaningfully slower than it; the matrix is built on every
call from the values as they are then, and gradients reach only the values. Without autograd on
the CPU the product is added straight into the k x k output (oneDNN's fused convolution-plus-sum
in channels-last; one MKL ``addmm`` for tiny products).

Non-finite inputs (docs/design.md §9): ``0 * inf`` on the stored zeros is NaN where the definition
adds nothing, so an eager CPU call sums its input first and, when that sum is not finite, computes
with ``blocked``. Where the sum would cost a device synchronisation or a graph break the check is
left out; only an output that is non-finite in the definition too can then differ (``+-inf`` vs NaN).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..pattern import HetConvPattern
from . import blocked
from ._common import CONV, Call, centre, centre_origin, channels_last, crop, kxk_part, rows

__all__ = ["compute", "SMALL_PRODUCT"]

SMALL_PRODUCT = 1 << 25  # MACs under which one MKL product beats a oneDNN call (measured: 2-3x at batch 1)


def _weight(values: Tensor, pattern: HetConvPattern) -> Tensor:
    """The ``(N, M, 1, ...)`` 1 x 1 convolution weight with a zero block diagonal."""
    return pattern.scatter_1x1(values).view((pattern.out_channels, pattern.in_channels) + (1,) * pattern.dims)


def _fusable(input: Tensor, out: Tensor, call: Call) -> bool:
    """Whether oneDNN can add the 1 x 1 convolution straight into ``out`` (an eager call without
    autograd, in channels-last, reading the input from its first pixel)."""
    if input.dim() != 4 or input.device.type != "cpu" or input.numel() == 0 or out.numel() == 0:
        return False
    if not channels_last(input) or centre_origin(input, call) is not input:
        return False
    if not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled or out.dtype != input.dtype:
        return False  # (under autocast the k x k output is already in the lower precision)
    if input.dtype == torch.float32:
        return True
    return input.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _accumulate_small(out: Tensor, input: Tensor, values: Tensor, call: Call) -> Tensor | None:
    """No-grad calls with little work: one ``addmm`` into the output's rows, or None if it does not apply.

    oneDNN's per-call overhead dominates a tiny 1 x 1 convolution (batch 1, deep layers), where one
    MKL product of the channels-last rows with the dense matrix is 2-3x faster.
    """
    pattern = call.pattern
    x = centre(input, out, call)
    pixels = x.shape[0] * math.prod(x.shape[2:])
    if pixels * pattern.in_channels * pattern.out_channels > SMALL_PRODUCT or x.numel() == 0:
        return None
    rows_in, rows_out = rows(x), rows(out)
    if rows_in is None or rows_out is None:
        return None
    # In the output's dtype: under autocast the k x k output may be lower precision than the values.
    matrix = pattern.scatter_1x1(values).view(pattern.out_channels, pattern.in_channels).t().to(out.dtype)
    rows_out.addmm_(rows_in.to(out.dtype), matrix)
    return out


def compute(input: Tensor, weight_kxk: Tensor, weight_1x1: Tensor, bias: Tensor | None, call: Call) -> Tensor:
    if call.nonfinite:  # 0 * inf: the zeros must not be multiplied (the dispatcher summed the input)
        return blocked.compute(input, weight_kxk, weight_1x1, bias, call)
    pattern = call.pattern
    out = kxk_part(input, weight_kxk, bias, call)
    # The in-place fast paths are for ordinary eager calls: graph capture records stock operations
    # only, and fake or torch.func-wrapped tensors are better served by the plain convolution.
    fast = not call.grad and call.eager
    if fast:
        small = _accumulate_small(out, input, weight_1x1, call)
        if small is not None:
            return small
    weight = _weight(weight_1x1, pattern)
    if fast and _fusable(input, out, call):
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            out, input, weight, None, [0, 0], list(call.stride), [1, 1], 1, "add", None, None, [], None
        )
    y = CONV[pattern.dims](centre_origin(input, call), weight, None, call.stride)
    return out.add_(crop(y, out.shape[2:]))
