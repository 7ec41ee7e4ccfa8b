"""The HetConv operator in stock PyTorch operations: the formulation ``het_conv2d`` runs wherever no
compiled kernel computes a call (float64, devices without one, dilation, an install without the
CPU kernels), and the products the kernels' own backwards share.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. The k x k part is a grouped
convolution; the 1 x 1 part reads the input at the k x k kernels' centre taps and multiplies only
the kernels that exist: per group ``g``, the compact values of its filters times the input
channels before and after block ``g`` (two matrix products over contiguous slices). No zero is
multiplied and nothing is scattered, so non-finite inputs give the definition's answer
(docs/design.md §9). Every function takes tensors in any memory format and returns channels-last
results where it builds them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CL = torch.channels_last


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


def out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """``nn.Conv2d``'s output size along one dimension."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def centre(x: Tensor, out_hw, kernel, stride, padding, dilation) -> Tensor:
    """The view of ``x`` (or of a tensor of its shape) at the k x k kernels' centre taps of every output
    pixel: what the 1 x 1 part reads (the op keeps ``0 <= padding <= dilation * (k // 2)``)."""
    (oh, ow), (kh, kw) = out_hw, kernel
    top, left = dilation[0] * (kh // 2) - padding[0], dilation[1] * (kw // 2) - padding[1]
    return x[:, :, top::stride[0], left::stride[1]][:, :, :oh, :ow]


def rows(x: Tensor) -> Tensor:
    """``(pixels, channels)`` rows of an NCHW-shaped tensor (a view when it is channels-last)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def compact_product(rows: Tensor, values: Tensor, part: int, out: Tensor | None = None) -> Tensor:
    """``rows @ W^T`` for the compact values of a HetConv 1 x 1 part (``2P`` products over contiguous
    channel slices), added into ``out`` (pixels x F) when given.

    Args:
        rows (Tensor[pixels, C]): input rows. values (Tensor[F, C - C/P]): compact values.
    """
    cin, nb = rows.shape[1], values.shape[0] // part
    mb = cin // part
    if out is None:
        out = rows.new_zeros((rows.shape[0], values.shape[0]))
    for g in range(part):
        w, target = values[g * nb:(g + 1) * nb], out[:, g * nb:(g + 1) * nb]
        if g:
            target.addmm_(rows[:, :g * mb], w[:, :g * mb].t())
        if g < part - 1:
            target.addmm_(rows[:, (g + 1) * mb:], w[:, g * mb:].t())
    return out


def compact_gradient(grad_rows: Tensor, rows: Tensor, part: int) -> Tensor:
    """The gradient of the compact values: ``dY_g^T X`` over the existing kernels only.

    Args:
        grad_rows (Tensor[pixels, N]), rows (Tensor[pixels, M]). Returns: Tensor[N, M - M/P].
    """
    cout, cin = grad_rows.shape[1], rows.shape[1]
    nb, mb = cout // part, cin // part
    out = grad_rows.new_empty((cout, cin - mb))
    for g in range(part):
        dy = grad_rows[:, g * nb:(g + 1) * nb].t()
        torch.mm(dy, rows[:, :g * mb], out=out[g * nb:(g + 1) * nb, :g * mb])
        torch.mm(dy, rows[:, (g + 1) * mb:], out=out[g * nb:(g + 1) * nb, g * mb:])
    return out


def transposed_values(weight_1x1: Tensor, part: int) -> Tensor:
    """Compact values of the transposed layer's 1 x 1 part.

    The transposed ``(M, N)`` matrix has the HetConv pattern of ``N`` inputs, ``M`` filters and the
    same ``P``, so it is compact again: a permutation of ``P (P - 1)`` blocks, each transposed.
    Its block ``(h, s)`` (filters of group ``h``, ``s``-th other group) holds original group
    ``g = s + [s >= h]``, whose compact block for channel block ``h`` is ``t = h - [h > g]``.

    Args:
        weight_1x1 (Tensor[N, M - M/P]): compact values of the layer.

    Returns:
        Tensor[M, N - N/P]: row ``c`` lists the transposed layer's filter ``c`` in increasing
        channel order.
    """
    cout, width = weight_1x1.shape
    nb, mb = cout // part, width // (part - 1)
    h = torch.arange(part, device=weight_1x1.device)[:, None]
    s = torch.arange(part - 1, device=weight_1x1.device)[None, :]
    g = s + (s >= h).long()
    t = h - (h > g).long()
    blocks = weight_1x1.reshape(part, nb, part - 1, mb).permute(0, 2, 3, 1)  # [g, t, i, jj]
    return blocks[g, t].permute(0, 2, 1, 3).reshape(part * mb, (part - 1) * nb)


def forward(input: Tensor, weight_kxk: Tensor, weight_1x1: Tensor, bias: Tensor | None, stride, padding, dilation,
            part: int) -> Tensor:
    """The layer: a grouped k x k convolution (in float32 where oneDNN's bfloat16 one is wrong,
    :func:`bf16_conv_is_wrong`) plus the compact 1 x 1 products added into its
    channels-last rows.

    With a weight that is not finite the zero padding is multiplied by it, as the definition's
    zero-padded convolution does (``0 * inf`` is NaN): oneDNN's channels-last kernels skip the
    padding instead, so the input is padded explicitly then (docs/design.md §9).
    """
    x = input.contiguous(memory_format=CL)
    kernel = weight_kxk.shape[2:]
    hw = [out_size(n, k, s, p, d) for n, k, s, p, d in zip(x.shape[2:], kernel, stride, padding, dilation)]
    if x.numel() == 0 or 0 in hw:
        return x.new_zeros((x.shape[0], weight_kxk.shape[0], *hw)).contiguous(memory_format=CL)
    k_input, k_padding = x, padding
    if any(padding) and not bool(torch.isfinite(weight_kxk).all()):
        k_input, k_padding = F.pad(x, (padding[1], padding[1], padding[0], padding[0])), (0, 0)
    if bf16_conv_is_wrong(x, tuple(stride)):
        out = F.conv2d(k_input.float(), weight_kxk.float(), None if bias is None else bias.float(), stride, k_padding,
                       dilation, part).to(x.dtype)
    else:
        out = F.conv2d(k_input, weight_kxk, bias, stride, k_padding, dilation, part)
    out = out.contiguous(memory_format=CL)
    if part > 1:
        compact_product(rows(centre(x, hw, kernel, stride, padding, dilation)), weight_1x1, part, out=rows(out))
    return out


def grad_input(grad: Tensor, weight_kxk: Tensor, weight_1x1: Tensor, input_size, stride, padding, dilation,
               part: int) -> Tensor:
    """The input gradient: the grouped transposed convolution plus the transposed compact product
    added at the centre taps' positions."""
    if grad.numel() == 0 or 0 in tuple(input_size):
        return grad.new_zeros(list(input_size)).contiguous(memory_format=CL)
    out = torch.nn.grad.conv2d_input(list(input_size), weight_kxk, grad, stride, padding, dilation, part)
    out = out.contiguous(memory_format=CL)
    if part > 1:
        batch, _, oh, ow = grad.shape
        pointwise = compact_product(rows(grad), transposed_values(weight_1x1, part), part)
        centre(out, (oh, ow), weight_kxk.shape[2:], stride, padding, dilation).add_(
            pointwise.view(batch, oh, ow, -1).permute(0, 3, 1, 2))
    return out


def grad_weight(grad: Tensor, input: Tensor, kernel_size, stride, padding, dilation, part: int
                ) -> tuple[Tensor, Tensor]:
    """The gradients of ``weight_kxk`` (a grouped convolution's, in float32 where oneDNN's bfloat16
    one is wrong) and of the compact ``weight_1x1`` (:func:`compact_gradient`)."""
    cout, cin = grad.shape[1], input.shape[1]
    shape = (cout, cin // part) + tuple(kernel_size)
    if grad.numel() == 0 or input.numel() == 0:
        return grad.new_zeros(shape), grad.new_zeros((cout, cin - cin // part))
    g, x = (grad.float(), input.float()) if bf16_conv_is_wrong(input, tuple(stride)) else (grad, input)
    # (contiguous, as every implementation returns it: the operator's fake kernel says so)
    grad_kxk = torch.nn.grad.conv2d_weight(x, shape, g, stride, padding, dilation, part).to(input.dtype).contiguous()
    if part == 1:
        return grad_kxk, grad.new_zeros((cout, 0))
    samples = centre(input, grad.shape[2:], kernel_size, stride, padding, dilation)
    return grad_kxk, compact_gradient(rows(grad), rows(samples), part)
