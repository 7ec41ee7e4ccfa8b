"""``blocked``: per group, two matrix products over the contiguous channel slices before and
after the group's block, added into the k x k output in place (no gather). A channels-last input
is read in place; with autograd an NCHW one is copied to channels-last once (its products would
otherwise each keep a copy of their slice for the backward)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import Call, centre, channels_last, kxk_part

__all__ = ["compute"]


def compute(input: Tensor, weight_kxk: Tensor, weight_1x1: Tensor, bias: Tensor | None, call: Call) -> Tensor:
    pattern = call.pattern
    if call.grad and call.eager and input.dim() in (4, 5) and not channels_last(input):
        # With autograd, the NCHW products below each save a copy of their channel slice of the
        # input (matmul folds the batch into the rows): P copies in all, 67x a P = 64 layer's input
        # in memory. One channels-last copy of the input instead, and the row products on it.
        input = input.contiguous(memory_format=torch.channels_last if input.dim() == 4 else torch.channels_last_3d)
    out = kxk_part(input, weight_kxk, bias, call)
    # In the output's dtype: under autocast the in-place products would not be cast for us.
    x = centre(input, out, call).to(out.dtype)
    batch = x.shape[0]
    p, n, m = pattern.part, pattern.block_out, pattern.block_in
    blocks = weight_1x1.to(out.dtype).view(p, n, pattern.num_1x1)
    if call.eager and channels_last(x) and channels_last(out):
        # (B*L, M) and (B*L, N) views of channels-last tensors: channel slices are column blocks,
        # and each group's products are added straight into its columns of the output.
        rows = x.movedim(1, -1).reshape(-1, pattern.in_channels)
        target = out.movedim(1, -1).reshape(-1, pattern.out_channels)
        for g in range(p):
            part = target[:, g * n:(g + 1) * n]
            if g:
                part.addmm_(rows[:, :g * m], blocks[g, :, :g * m].t())
            if g < p - 1:
                part.addmm_(rows[:, (g + 1) * m:], blocks[g, :, g * m:].t())
        return out
    pixels = math.prod(x.shape[2:])
    cols = x.reshape(batch, pattern.in_channels, pixels)
    target = out.view(batch, pattern.out_channels, pixels) if out.is_contiguous() else None
    for g in range(p):
        terms = []
        if g:
            terms.append(blocks[g, :, :g * m] @ cols[:, :g * m])
        if g < p - 1:
            terms.append(blocks[g, :, g * m:] @ cols[:, (g + 1) * m:])
        y = terms[0] if len(terms) == 1 else terms[0] + terms[1]
        if target is not None:
            target[:, g * n:(g + 1) * n] += y
        else:
            out[:, g * n:(g + 1) * n] += y.view((batch, n) + out.shape[2:])
    return out
