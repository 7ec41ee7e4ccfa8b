"""``fused``: the whole 2-D layer as the registered operator ``torch.ops.sparse_hetconv.het_conv2d``.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. The operator
(:mod:`sparse_hetconv.ops`) computes only the kernels that exist: on the CPU with the compiled
kernels built with the package (AVX-512 or AVX2, docs/design.md §11), on CUDA with the Triton
kernel (§10), elsewhere with stock operations; forward, backward, double backward and forward-mode
AD are its own, and ``torch.compile`` / ``torch.export`` record it as one node. ``triton`` is the
same operator with the Triton kernel required (CUDA, or Triton's interpreter on the CPU).

Calls it does not take resolve to ``blocked``: 3-D layers, and calls inside a ``torch.func``
transform other than ``vmap`` (custom operators have no rule for ``torch.func.grad`` and its
relatives); ``layer.resolved_backend`` says so.
"""

from __future__ import annotations

from torch import Tensor

from .. import ops
from ._common import Call

__all__ = ["compute", "triton"]


def compute(input: Tensor, weight_kxk: Tensor, weight_1x1: Tensor, bias: Tensor | None, call: Call) -> Tensor:
    return ops.het_conv2d(input, weight_kxk, weight_1x1, bias, call.stride, call.padding, call.dilation,
                          call.pattern.part, "auto")


def triton(input: Tensor, weight_kxk: Tensor, weight_1x1: Tensor, bias: Tensor | None, call: Call) -> Tensor:
    return ops.het_conv2d(input, weight_kxk, weight_1x1, bias, call.stride, call.padding, call.dilation,
                          call.pattern.part, "triton")
