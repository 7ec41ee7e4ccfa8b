"""``grouped``: the 1 x 1 part as ``P - 1`` grouped 1 x 1 convolutions, one per block offset.

For offset ``s`` a grouped 1 x 1 convolution (``groups = P``) lets output group ``g`` read input
block ``(g + s) mod P`` (:meth:`~sparse_hetconv.HetConvPattern.shift_index` lays the compact values
out for it). Only existing kernels are multiplied, forward and backward, on the stock convolution
kernels.
"""

from __future__ import annotations

from torch import Tensor

from ..pattern import HetConvPattern
from ._common import CONV, Call, centre_origin, crop, kxk_part

__all__ = ["compute"]


def _weights(values: Tensor, pattern: HetConvPattern) -> Tensor:
    weight = values.reshape(-1)[pattern.shift_index(values.device)]
    return weight.view(weight.shape + (1,) * pattern.dims)


def compute(input: Tensor, weight_kxk: Tensor, weight_1x1: Tensor, bias: Tensor | None, call: Call) -> Tensor:
    pattern = call.pattern
    out = kxk_part(input, weight_kxk, bias, call)
    weights = _weights(weight_1x1, pattern)
    p, n = pattern.part, pattern.block_out
    conv = CONV[pattern.dims]
    x = centre_origin(input, call)
    for s in range(1, p):
        y = crop(conv(x, weights[s - 1], None, call.stride, 0, 1, p), out.shape[2:])
        split = (p - s) * n  # groups 0 .. P-s-1 read blocks s .. P-1; the others wrap around
        out[:, :split] += y[:, s * n:]
        out[:, split:] += y[:, :s * n]
    return out
