"""The HetConv operation as pure functions, and the backends that compute its 1 x 1 part.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. The k x k part is a grouped
convolution (``groups = P``) with padding ``k // 2``; the 1 x 1 part multiplies the compact values
``weight_1x1`` (``N x (M - M/P)``, DESIGN section 3) with the input sampled at the same stride and
is accumulated into the k x k part's output (no separate sum tensor). Every backend computes the
same numbers; they differ only in speed:

* ``dense``: scatter the values into a zero ``N x M`` matrix and run one 1 x 1 convolution. Without
  autograd on the CPU, the convolution adds straight into the k x k output (oneDNN's fused sum,
  channels-last), or, for tiny products (batch 1), one ``addmm`` into the output's rows; a
  layer's scattered matrix is then cached until its values change (:class:`WeightCache`).
* ``grouped``: the 1 x 1 part as ``P - 1`` grouped 1 x 1 convolutions (``groups = P``), one per
  block offset ``s``: output group ``g`` reads input block ``(g + s) mod P``. Only existing kernels
  are multiplied, forward and backward, on the stock convolution kernels.
* ``blocked``: per group, two matrix products over the contiguous channel slices before and
  after the group's block, added into the output in place.
* ``torch_sparse``: the literal ``torch.sparse`` CSR matrix times the input, through a custom
  autograd function whose backward computes only the existing kernels' gradients.
* ``auto``: :func:`sparse_hetconv.autotune.choose` picks one per call signature.

:class:`sparse_hetconv.SparseHetConv2d` wraps :func:`het_conv2d`.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_input
from .pattern import HetConvPattern, cached_index

__all__ = ["BACKENDS", "WeightCache", "het_conv", "het_conv2d", "het_conv3d", "select_backend"]

BACKENDS = ("auto", "dense", "grouped", "blocked", "torch_sparse")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def select_backend(pattern: HetConvPattern, input: Tensor | None = None, training: bool | None = None) -> str:
    """The backend ``"auto"`` resolves to for a layer of this pattern and this input.

    See :func:`sparse_hetconv.autotune.choose`: the choice depends on (shape, part, device, dtype,
    memory format, training) only, and is cached per signature.
    """
    from .autotune import choose

    return choose(pattern, input, training)


class WeightCache:
    """Prepared 1 x 1 weights of one layer, reused across calls that need no gradient.

    An entry is keyed by the values' storage, version counter, dtype and device, so any in-place
    update (an optimizer step, ``load_state_dict``) or move invalidates it. Calls that need a
    gradient never use it: they rebuild the prepared weight inside autograd.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, Tensor]] = {}

    def get(self, kind: str, values: Tensor, build) -> Tensor:
        """The prepared weight ``build(values)`` for ``kind``, rebuilt only when ``values`` changed."""
        key = (values.data_ptr(), values._version, values.dtype, values.device, tuple(values.shape))
        entry = self._entries.get(kind)
        if entry is not None and entry[0] == key:
            return entry[1]
        with torch.inference_mode(False), torch.no_grad():
            prepared = build(values.detach())
        self._entries[kind] = (key, prepared)
        return prepared

    def clear(self) -> None:
        """Drop every prepared weight."""
        self._entries.clear()

    def __getstate__(self) -> dict:
        # Copies and pickles start empty: the entries are keyed by this process's storage
        # addresses, and would add a dense N x M matrix per layer to every saved model.
        return {"_entries": {}}

    def nbytes(self) -> int:
        """Bytes held by the prepared weights."""
        return sum(t.numel() * t.element_size() for _, t in self._entries.values())


def _subsample(input: Tensor, stride: tuple[int, ...]) -> Tensor:
    if all(s == 1 for s in stride):
        return input
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)
    return input[index]


def _channels_last(x: Tensor) -> bool:
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    return False


# -- dense ----------------------------------------------------------------------------------------
def _scatter(values: Tensor, pattern: HetConvPattern) -> Tensor:
    """The ``(N, M, 1, ...)`` 1 x 1 weight with the values in place and a zero block diagonal.

    No index tensor: laid out block-major, the ``P x P`` grid of ``n x m`` blocks has its zero
    blocks at flat positions ``g (P + 1)``; dropping the first block, the other ``P^2 - 1`` fall
    into ``P - 1`` rows of ``P + 1`` whose first ``P`` are, in row-major order, exactly the compact
    blocks (row ``g``'s blocks in increasing channel order) and whose last is a zero block. One
    strided copy fills them; one permutation returns to the ``(N, M)`` layout. Measured here 2-3x
    faster than ``index_put`` with the flat indices, forward and backward.
    """
    p, n, m = pattern.part, pattern.block_out, pattern.block_in
    blocks = values.view(p, n, p - 1, m).permute(0, 2, 1, 3).reshape(p - 1, p, n, m)
    grid = values.new_zeros(p * p, n, m)
    grid[1:].view(p - 1, p + 1, n, m)[:, :p] = blocks
    dense = grid.view(p, p, n, m).permute(0, 2, 1, 3).reshape(pattern.out_channels, pattern.in_channels)
    return dense.view((pattern.out_channels, pattern.in_channels) + (1,) * pattern.dims)


def _fusable(input: Tensor, out: Tensor) -> bool:
    """Whether oneDNN can add the 1 x 1 convolution straight into ``out`` (no autograd path)."""
    if input.dim() != 4 or input.device.type != "cpu" or input.numel() == 0 or out.numel() == 0:
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or not torch.backends.mkldnn.is_available():
        return False  # graph capture records stock operations only (jit.trace rejects this one)
    if not torch.backends.mkldnn.enabled or out.dtype != input.dtype:
        return False  # (under autocast the k x k output is already in the lower precision)
    if input.dtype == torch.float32:
        return True
    return input.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


_SMALL_PRODUCT = 1 << 25  # MACs under which one MKL product beats a oneDNN call (measured: 2-3x at batch 1)


def _accumulate_dense_small(out, input, values, pattern, stride, cache) -> Tensor | None:
    """No-grad calls with little work: one ``addmm`` into the output's rows, or None if it does not apply.

    oneDNN's per-call overhead dominates a tiny 1 x 1 convolution (batch 1, deep layers), where one
    MKL product of the channels-last rows with the cached dense matrix is 2-3x faster.
    """
    x = _subsample(input, stride)
    pixels = x.shape[0] * math.prod(x.shape[2:])
    if pixels * pattern.in_channels * pattern.out_channels > _SMALL_PRODUCT or x.numel() == 0:
        return None
    rows_in, rows_out = _rows(x), _rows(out)
    if rows_in is None or rows_out is None or torch.compiler.is_compiling():
        return None
    shape = (pattern.in_channels, pattern.out_channels)
    matrix = cache.get("dense_t", values, lambda v: _scatter(v, pattern).view(shape[::-1]).t().contiguous()) \
        if cache is not None else _scatter(values, pattern).view(shape[::-1]).t()
    rows_out.addmm_(rows_in, matrix)
    return out


def _rows(x: Tensor) -> Tensor | None:
    """``(pixels, channels)`` view of a channels-last (or single-pixel) tensor, else None."""
    if x.dim() not in (4, 5):
        return None
    if _channels_last(x) or x.is_contiguous() and math.prod(x.shape[2:]) == 1:
        rows = x.movedim(1, -1)
        return rows.view(-1, x.shape[1]) if rows.is_contiguous() else None
    return None


def _accumulate_dense(out, input, values, pattern, stride, grad, cache):
    if not grad:
        small = _accumulate_dense_small(out, input, values, pattern, stride, cache)
        if small is not None:
            return small
    if grad or cache is None:
        weight = _scatter(values, pattern)
    else:
        weight = cache.get("dense", values, lambda v: _scatter(v, pattern))
    if not grad and _fusable(input, out) and _channels_last(input):
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            out, input, weight, None, [0, 0], list(stride), [1, 1], 1, "add", None, None, [], None
        )
    return out.add_(_CONV[pattern.dims](input, weight, None, stride))


# -- grouped --------------------------------------------------------------------------------------
def _shift_index(pattern: HetConvPattern, device) -> Tensor:
    """Positions in the flat compact values of the grouped weights, ``(P - 1, N, m)``.

    For offset ``s`` the grouped convolution's output block ``h`` uses input block ``h``, and holds
    the filters of group ``g = (h - s) mod P``, whose compact block index for channel block ``h``
    is ``h`` before their own block and ``h - 1`` after it. Every value is used exactly once.
    """

    def build():
        p, n, m, width = pattern.part, pattern.block_out, pattern.block_in, pattern.num_1x1
        s = torch.arange(1, p, device=device)[:, None]
        h = torch.arange(p, device=device)[None, :]
        g = (h - s) % p
        t = torch.where(h < g, h, h - 1)
        rows = g[:, :, None] * n + torch.arange(n, device=device)  # (P-1, P, n)
        cols = t[:, :, None] * m  # (P-1, P, 1)
        start = rows * width + cols
        return (start[..., None] + torch.arange(m, device=device)).reshape(p - 1, p * n, m)

    key = ("shift", pattern.in_channels, pattern.out_channels, pattern.part, torch.device(device))
    return cached_index(key, build)


def _shift_weights(values: Tensor, pattern: HetConvPattern) -> Tensor:
    index = _shift_index(pattern, values.device)
    weight = values.reshape(-1)[index]
    return weight.view(weight.shape + (1,) * pattern.dims)


def _accumulate_grouped(out, input, values, pattern, stride, grad, cache):
    if grad or cache is None:
        weights = _shift_weights(values, pattern)
    else:
        weights = cache.get("grouped", values, lambda v: _shift_weights(v, pattern))
    p, n = pattern.part, pattern.block_out
    conv = _CONV[pattern.dims]
    for s in range(1, p):
        y = conv(input, weights[s - 1], None, stride, 0, 1, p)
        split = (p - s) * n  # groups 0 .. P-s-1 read blocks s .. P-1; the others wrap around
        out[:, :split] += y[:, s * n:]
        out[:, split:] += y[:, :s * n]
    return out


# -- blocked --------------------------------------------------------------------------------------
def _accumulate_blocked(out, input, values, pattern, stride, grad, cache):
    # In the output's dtype: under autocast the in-place products would not be cast for us.
    x = _subsample(input, stride).to(out.dtype)
    batch = x.shape[0]
    p, n, m = pattern.part, pattern.block_out, pattern.block_in
    blocks = values.to(out.dtype).view(p, n, pattern.num_1x1)
    if _channels_last(x) and _channels_last(out):
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


# -- torch_sparse ---------------------------------------------------------------------------------
def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(crow, col, values.reshape(-1), size=shape)


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


def _accumulate_torch_sparse(out, input, values, pattern, stride, grad, cache):
    if torch.compiler.is_exporting():
        raise ValueError(
            "backend 'torch_sparse' cannot be exported: torch.export does not trace torch.sparse CSR "
            "tensors; set the layers' backend to 'dense', 'grouped' or 'blocked' (the same numbers) first")
    x = _subsample(input, stride)
    batch, spatial = x.shape[0], x.shape[2:]
    # MKL's sparse kernels on the CPU have no half-precision path: compute those in float32.
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    cols = x.movedim(1, 0).reshape(pattern.in_channels, -1).to(compute)
    values = values.to(compute)
    if cols.shape[1] == 0:
        y = cols.new_zeros((pattern.out_channels, 0)) + 0 * values.sum()
    else:
        shape = (pattern.out_channels, pattern.in_channels)
        with torch.autocast(x.device.type, enabled=False):  # autocast would cast the CSR product down
            y = _CsrMatmul.apply(values, cols, pattern.crow_indices(x.device), pattern.col_indices(x.device), shape)
    return out.add_(y.to(x.dtype).view(pattern.out_channels, batch, *spatial).movedim(0, 1))


_ACCUMULATE = {
    "dense": _accumulate_dense,
    "grouped": _accumulate_grouped,
    "blocked": _accumulate_blocked,
    "torch_sparse": _accumulate_torch_sparse,
}


def needs_grad(input: Tensor, *weights: Tensor | None) -> bool:
    """Whether autograd will record a call on these tensors (the ``training`` of :mod:`autotune`)."""
    if not torch.is_grad_enabled():
        return False
    return input.requires_grad or any(w is not None and w.requires_grad for w in weights)


def _het_conv(input: Tensor, weight_kxk: Tensor, weight_1x1: Tensor | None, bias: Tensor | None,
              stride: tuple[int, ...], pattern: HetConvPattern, backend: str,
              cache: WeightCache | None = None) -> Tensor:
    """:func:`het_conv` without argument checks; ``backend`` is concrete or ``"auto"``."""
    out = _CONV[pattern.dims](input, weight_kxk, bias, stride, pattern.padding, 1, pattern.part)
    if pattern.part == 1:
        return out
    grad = needs_grad(input, weight_kxk, weight_1x1, bias)
    if backend == "auto":
        backend = select_backend(pattern, input, grad)
    if torch.compiler.is_compiling():
        cache = None  # keyed by data pointers, which a compiled graph cannot compare or keep
    return _ACCUMULATE[backend](out, input, weight_1x1, pattern, stride, grad, cache)


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
        backend (str): one of :data:`BACKENDS` (``"auto"``, ``"dense"``, ``"grouped"``,
            ``"blocked"``, ``"torch_sparse"``); all exact.
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
        if backend not in BACKENDS:
            raise ValueError(f"backend ({backend!r}) must be one of {BACKENDS}")
        if not isinstance(input, Tensor) or input.dim() != dims + 2:
            check_input(input, 0, dims, "het_conv")  # raises the type or rank error first
        # int(): under torch.jit.trace sizes are traced tensors, which the pattern's checks reject.
        pattern = HetConvPattern(int(input.shape[1]) if input.dim() > 1 else 0, int(weight_kxk.shape[0]), part,
                                 tuple(int(k) for k in weight_kxk.shape[2:]), dims)
        _check_weights(pattern, weight_kxk, weight_1x1, bias)
        check_input(input, pattern.in_channels, dims, "het_conv")
    stride = (stride,) * dims if isinstance(stride, int) else tuple(stride)
    return _het_conv(input, weight_kxk, weight_1x1, bias, stride, pattern, backend)


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
