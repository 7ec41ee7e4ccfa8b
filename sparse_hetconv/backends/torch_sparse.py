"""``torch_sparse``: the literal torch.sparse CSR matrix of the 1 x 1 part times the input.

Through a custom autograd function whose backward computes only the existing kernels' gradients
(a sampled product on the pattern, no ``N x M`` dense gradient; under vmap, i.e. batched gradients,
which has no rule for CSR tensors, the same products on the dense matrix) and whose forward-mode
rule is the product's own (bilinear) derivative. MKL's CPU sparse kernels have no
half-precision path, so float16 / bfloat16 calls compute in float32; ``torch.export`` does not
trace CSR tensors, so this backend refuses export with a message naming the ones that do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..pattern import csr_tensor
from ._common import Call, centre, kxk_part, transformed

__all__ = ["compute"]


def _batched(t: Tensor) -> bool:
    """Whether ``t`` is a batched tensor of ``torch.autograd.grad(..., is_grads_batched=True)``, whose
    vmap (``torch._vmap_internals``) is invisible to ``torch.func``'s level checks: its dispatch
    keys name it."""
    return "Batched" in str(torch._C._dispatch_keys(t)).removeprefix("DispatchKeySet(").rstrip(")").split(", ")


class _CsrMatmul(torch.autograd.Function):
    """``y = W x`` with ``W`` the HetConv 1 x 1 pattern as a torch.sparse CSR matrix.

    Building the CSR tensor inside the function sidesteps PyTorch issue #98929 (a CSR tensor made
    from a parameter does not carry its gradient back); the backward returns the gradient of the
    compact values only.
    """

    @staticmethod
    def forward(values: Tensor, cols: Tensor, crow: Tensor, col: Tensor, shape: tuple[int, int]) -> Tensor:
        return csr_tensor(crow, col, values, shape) @ cols

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        values, cols, crow, col, shape = inputs
        ctx.save_for_backward(values, cols, crow, col)
        ctx.save_for_forward(values, cols, crow, col)
        ctx.shape = shape

    @staticmethod
    def jvp(ctx, d_values, d_cols, *_):
        # Bilinear: d(W x) = W(d_values) x + W(values) d_x, both on the pattern's CSR matrix.
        values, cols, crow, col = ctx.saved_tensors
        out = None
        if d_values is not None:
            out = csr_tensor(crow, col, d_values, ctx.shape) @ cols
        if d_cols is not None:
            term = csr_tensor(crow, col, values, ctx.shape) @ d_cols
            out = term if out is None else out + term
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, cols, crow, col = ctx.saved_tensors
        grad_values = grad_cols = None
        if transformed() or _batched(grad):
            # Batched gradients (``is_grads_batched``, ``jacobian(vectorize=True)``) run this under
            # vmap, which has no rule for CSR tensors: the same products on the dense matrix.
            rows = torch.repeat_interleave(torch.arange(ctx.shape[0], device=crow.device), crow.diff())
            if ctx.needs_input_grad[1]:
                dense = values.new_zeros(ctx.shape).index_put((rows, col), values.reshape(-1))
                grad_cols = dense.t() @ grad
            if ctx.needs_input_grad[0]:
                grad_values = (grad @ cols.t())[..., rows, col].reshape(grad.shape[:-2] + values.shape)
            return grad_values, grad_cols, None, None, None
        # A backward run inside an autocast region (``loss.backward()`` in the ``with`` block) would
        # cast these products down too, and MKL's CSR kernels have no half-precision path.
        with torch.autocast(grad.device.type, enabled=False):
            if ctx.needs_input_grad[1]:
                grad_cols = (grad.t() @ csr_tensor(crow, col, values, ctx.shape)).t()
            if ctx.needs_input_grad[0]:
                # zeros, not empty: sampled_addmm reads the template even with beta=0 (NaN otherwise)
                template = csr_tensor(crow, col, torch.zeros_like(values), ctx.shape)
                sampled = torch.sparse.sampled_addmm(template, grad.contiguous(), cols.t().contiguous(), beta=0.0)
                grad_values = sampled.values().view_as(values)
        return grad_values, grad_cols, None, None, None


def compute(input: Tensor, weight_kxk: Tensor, weight_1x1: Tensor, bias: Tensor | None, call: Call) -> Tensor:
    pattern = call.pattern
    out = kxk_part(input, weight_kxk, bias, call)
    x = centre(input, out, call)
    batch, spatial = x.shape[0], x.shape[2:]
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    cols = x.movedim(1, 0).reshape(pattern.in_channels, -1).to(compute)
    values = weight_1x1.to(compute)
    if cols.shape[1] == 0:
        y = cols.new_zeros((pattern.out_channels, 0)) + 0 * values.sum()
    else:
        with torch.autocast(x.device.type, enabled=False):  # autocast would cast the CSR product down
            shape = (pattern.out_channels, pattern.in_channels)
            y = _CsrMatmul.apply(values, cols, pattern.crow_indices(x.device), pattern.col_indices(x.device), shape)
    return out.add_(y.to(out.dtype).view(pattern.out_channels, batch, *spatial).movedim(0, 1))
