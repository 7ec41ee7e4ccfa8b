"""The sparse HetConv: a dense grouped k x k part and only the 1 x 1 kernels that exist.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. The 1 x 1 part is stored as
the compact values of DESIGN section 3 (``N x (M - M/P)``, row ``j`` in increasing channel order);
the same values are a torch.sparse CSR matrix (:meth:`SparseHetConv2d.sparse_weight`) and a
``scipy.sparse`` CSR array (:meth:`SparseHetConv2d.to_scipy`). Because only existing kernels are
parameters, no gradient ever reaches a missing one: no masking, and any stock optimizer works.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import torch
from torch import Tensor, nn

from ._base import _HetConvBase
from ._checks import check_int
from .functional import BACKENDS, _csr, het_conv
from .masked import MaskedHetConv2d, MaskedHetConv3d, read_hetconv_weights

__all__ = ["SparseHetConv2d", "SparseHetConv3d"]

_REDUCTIONS = ("centre", "sum")


class _SparseHetConvNd(_HetConvBase):
    _masked_type: type

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        part: int,
        kernel_size=3,
        stride=1,
        bias: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self._init_geometry(in_channels, out_channels, part, kernel_size, stride)
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        p = self.pattern
        self.weight_kxk = nn.Parameter(torch.empty((out_channels, p.block_in) + p.kernel_size, **factory))
        if part > 1:
            self.weight_1x1 = nn.Parameter(torch.empty((out_channels, p.num_1x1), **factory))
        else:
            self.register_parameter("weight_1x1", None)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    # -- nn.Module ----------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """How the 1 x 1 part is computed: ``"auto"`` (default), ``"dense"``, ``"blocked"`` or
        ``"torch_sparse"``. Assign to pin one; all give the same numbers."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend ({value!r}) must be one of {BACKENDS}")
        self._backend = value

    def reset_parameters(self) -> None:
        """Uniform in ``+-1/sqrt(fan_in)``, ``fan_in = k^2 m + M - m`` (``nn.ConvNd``'s default
        bound over the kernels that exist)."""
        bound = self._init_bound()
        for param in (self.weight_kxk, self.weight_1x1, self.bias):
            if param is not None:
                nn.init.uniform_(param, -bound, bound)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        return het_conv(input, self.weight_kxk, self.weight_1x1, self.bias, self.stride, self.part,
                        self._backend, pattern=self.pattern)

    def extra_repr(self) -> str:
        text = self._geometry_repr()
        if self.bias is not None:
            text += ", bias=True"
        if self._backend != "auto":
            text += f", backend={self._backend!r}"
        return text

    # -- views of the 1 x 1 part ----------------------------------------------------------------
    def _values(self) -> Tensor:
        if self.weight_1x1 is None:
            return self.weight_kxk.new_zeros((self.out_channels, 0))
        return self.weight_1x1.detach()

    def dense_1x1(self) -> Tensor:
        """Returns:
        Tensor[out_channels, in_channels]: the 1 x 1 weights as a dense matrix, zero on the block
        diagonal (a new tensor, detached; what ``pwc.weight`` holds in the masked form).
        """
        return self.pattern.scatter_1x1(self._values())

    def sparse_weight(self, layout: torch.layout = torch.sparse_csr) -> Tensor:
        """The 1 x 1 part as a torch.sparse ``(out_channels, in_channels)`` matrix.

        The values are a view of ``weight_1x1`` (no copy: writes to one show in the other); the
        indices are derived from ``(M, N, P)``. The view is detached from autograd: PyTorch does
        not carry gradients from a CSR tensor back to its values (issue #98929), so train through
        ``forward`` (or :func:`sparse_hetconv.functional.het_conv2d`), not through this view.

        Args:
            layout: ``torch.sparse_csr`` (default) or ``torch.sparse_coo``.

        Returns:
            Tensor[out_channels, in_channels] in the requested sparse layout.
        """
        p, values = self.pattern, self._values()
        device, shape = values.device, (self.out_channels, self.in_channels)
        if layout == torch.sparse_csr:
            return _csr(p.crow_indices(device), p.col_indices(device), values, shape)
        if layout == torch.sparse_coo:
            rows = torch.arange(self.out_channels, device=device).repeat_interleave(p.num_1x1)
            indices = torch.stack([rows, p.col_indices(device)])
            return torch.sparse_coo_tensor(indices, values.reshape(-1), size=shape, is_coalesced=True,
                                           check_invariants=False)
        raise ValueError(f"layout ({layout}) must be torch.sparse_csr or torch.sparse_coo")

    def to_scipy(self) -> scipy.sparse.csr_array:
        """The 1 x 1 part as a ``scipy.sparse.csr_array`` of shape ``(out_channels, in_channels)``
        (a copy on the host; bfloat16 and float16 values become float32)."""
        p, values = self.pattern, self._values().cpu()
        if values.dtype in (torch.bfloat16, torch.float16):
            values = values.float()
        return scipy.sparse.csr_array(
            (values.reshape(-1).numpy().copy(), p.col_indices().numpy().copy(), p.crow_indices().numpy().copy()),
            shape=(self.out_channels, self.in_channels),
        )

    def from_scipy(self, matrix) -> "_SparseHetConvNd":
        """Load the 1 x 1 part from a ``scipy.sparse`` matrix; returns ``self``.

        Entries missing from the matrix are zero weights. Stored entries on the block diagonal
        must be zero: a non-zero one does not fit the HetConv pattern (``weight_kxk`` is untouched
        either way; to fold such a matrix into the centre taps, use :func:`to_sparse` on a module).

        Raises:
            TypeError: ``matrix`` is not a scipy sparse matrix or array.
            ValueError: wrong shape, or a non-zero entry where the pattern has no 1 x 1 kernel.
        """
        if not scipy.sparse.issparse(matrix):
            raise TypeError(f"matrix must be a scipy.sparse matrix or array, got {type(matrix).__name__}")
        expected = (self.out_channels, self.in_channels)
        if tuple(matrix.shape) != expected:
            raise ValueError(f"matrix has shape {tuple(matrix.shape)}, expected {expected} (out_channels, in_channels)")
        coo = scipy.sparse.coo_array(matrix)
        rows, cols, data = np.asarray(coo.row), np.asarray(coo.col), np.asarray(coo.data)
        p = self.pattern
        off = (rows // p.block_out == cols // p.block_in) & (data != 0)
        if off.any():
            r, c = int(rows[off][0]), int(cols[off][0])
            raise ValueError(
                f"matrix does not have the HetConv pattern: {int(off.sum())} non-zero entries on the "
                f"block diagonal, first at (row {r}, col {c}); filter {r} has its k x k kernels on "
                f"channels {p.kxk_channels(r).start}..{p.kxk_channels(r).stop - 1} (part={self.part})"
            )
        if self.weight_1x1 is None:
            return self
        dense = torch.zeros(expected, dtype=torch.float64)
        dense.index_put_((torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(cols.astype(np.int64))),
                         torch.from_numpy(data.astype(np.float64)), accumulate=True)
        with torch.no_grad():
            self.weight_1x1.copy_(p.gather_1x1(dense))
        return self

    # -- conversions --------------------------------------------------------------------------
    @classmethod
    def from_masked(cls, module: nn.Module, backend: str = "auto") -> "_SparseHetConvNd":
        """Build the sparse layer that computes exactly what a masked HetConv computes.

        Accepts :class:`MaskedHetConv2d` and any module shaped like the published one (children
        ``gwc`` and ``pwc`` with output ``gwc(x) + pwc(x)``). A non-zero ``pwc`` block diagonal is
        folded into ``gwc``'s centre taps, so unmasked "approximate HetConv" modules convert
        exactly too. The new layer has the source's device, dtype and train/eval state.

        Raises:
            ValueError: the module is not shaped like a HetConv of this dimension.
        """
        read = read_hetconv_weights(module)
        if read.pattern.dims != cls._dims:
            raise ValueError(f"{cls.__name__}.from_masked expects a {cls._dims}-D HetConv, got a "
                             f"{read.pattern.dims}-D one ({type(module).__name__})")
        return cls._from_weights(read, backend).train(module.training)

    @classmethod
    def _from_weights(cls, read, backend: str) -> "_SparseHetConvNd":
        p, weight = read.pattern, read.weight_kxk
        layer = cls(p.in_channels, p.out_channels, p.part, p.kernel_size, read.stride, read.bias is not None,
                    backend, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight_kxk.copy_(weight)
            if layer.weight_1x1 is not None:
                layer.weight_1x1.copy_(p.gather_1x1(read.dense_1x1))
            if layer.bias is not None:
                layer.bias.copy_(read.bias)
        return layer

    def to_masked(self) -> nn.Module:
        """The equivalent :class:`MaskedHetConv2d` (``3d``): the exact inverse of
        :meth:`from_masked`, with the same device, dtype and train/eval state."""
        weight = self.weight_kxk
        masked = self._masked_type(self.in_channels, self.out_channels, self.part, self.kernel_size, self.stride,
                                   self.bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            masked.gwc.weight.copy_(weight)
            masked.pwc.weight.copy_(self.dense_1x1().view(masked.pwc.weight.shape))
            if self.bias is not None:
                masked.gwc.bias.copy_(self.bias)
        return masked.train(self.training)

    @classmethod
    def from_dense(cls, conv: nn.Module, part: int, reduce: str = "centre", backend: str = "auto") -> "_SparseHetConvNd":
        """Initialise a HetConv from a standard convolution, to fine-tune a pretrained CNN.

        The k x k kernels on the pattern's blocks are kept exactly; every other kernel becomes a
        1 x 1 weight: its centre tap (``reduce="centre"``, the default: the part of the kernel a
        1 x 1 kernel keeps exactly) or the sum of its taps (``reduce="sum"``: the kernel's response
        to a locally constant input). This changes the layer's output; fine-tuning recovers it.

        Args:
            conv (nn.Conv2d or nn.Conv3d): ``groups=1``, dilation 1, an odd kernel with padding
                ``k // 2`` and zero padding mode; channels divisible by ``part``.
            part (int): ``P`` of the new layer.
            reduce (str): ``"centre"`` or ``"sum"``.

        Raises:
            TypeError: ``conv`` is not a convolution of this dimension.
            ValueError: the convolution cannot become a HetConv (the message says why).
        """
        reason = _dense_conv_problem(conv, part, cls._dims)
        if reason:
            raise ValueError(f"cannot turn {conv} into a HetConv with part={part}: {reason}")
        if reduce not in _REDUCTIONS:
            raise ValueError(f"reduce ({reduce!r}) must be one of {_REDUCTIONS}")
        weight = conv.weight.detach()
        layer = cls(conv.in_channels, conv.out_channels, part, conv.kernel_size, conv.stride,
                    conv.bias is not None, backend, device=weight.device, dtype=weight.dtype)
        p = layer.pattern
        n, m = p.block_out, p.block_in
        with torch.no_grad():
            for g in range(part):
                layer.weight_kxk[g * n:(g + 1) * n] = weight[g * n:(g + 1) * n, g * m:(g + 1) * m]
            if layer.weight_1x1 is not None:
                centre = (slice(None), slice(None)) + p.centre
                reduced = weight[centre] if reduce == "centre" else weight.flatten(2).sum(-1)
                layer.weight_1x1.copy_(p.gather_1x1(reduced))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer.train(conv.training)


def _dense_conv_problem(conv: nn.Module, part: int, dims: int) -> str | None:
    """Why a standard convolution cannot become a HetConv with this part (None if it can)."""
    conv_type = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
    if not isinstance(conv, conv_type):
        raise TypeError(f"conv must be an {conv_type.__name__}, got {type(conv).__name__}")
    check_int("part", part)
    if conv.groups != 1:
        return f"groups is {conv.groups}, expected 1"
    if all(k == 1 for k in conv.kernel_size):
        return "a 1x1 convolution has no k x k kernels to make heterogeneous"
    if any(k % 2 == 0 for k in conv.kernel_size):
        return f"kernel_size {tuple(conv.kernel_size)} is even; HetConv needs a centre tap"
    if isinstance(conv.padding, str) or tuple(conv.padding) != tuple(k // 2 for k in conv.kernel_size):
        return f"padding {conv.padding} is not kernel_size // 2"
    if any(d != 1 for d in conv.dilation) or conv.padding_mode != "zeros":
        return "dilation must be 1 and padding_mode 'zeros'"
    for name in ("in_channels", "out_channels"):
        if getattr(conv, name) % part:
            return f"{name} ({getattr(conv, name)}) is not divisible by part ({part})"
    return None


class SparseHetConv2d(_SparseHetConvNd):
    """HetConv with a dense grouped k x k part and a compact sparse 1 x 1 part.

    A drop-in for ``nn.Conv2d(M, N, k, stride, padding=k // 2)``: each of the ``N`` filters has
    ``M/P`` k x k kernels (on its group's block of channels) and ``M - M/P`` 1 x 1 kernels. See
    :func:`sparse_hetconv.functional.het_conv2d` for the operation and its backends.

    Args:
        in_channels (int): ``M``.
        out_channels (int): ``N``.
        part (int): ``P``; ``M`` and ``N`` must be divisible by it. ``P = 1`` is a standard
            convolution (no 1 x 1 part, ``weight_1x1`` is None).
        kernel_size (int or tuple): odd k; default 3.
        stride (int or tuple): stride of both parts; default 1.
        bias (bool): add a learnable bias; default False.
        backend (str): ``"auto"`` (default), ``"dense"``, ``"blocked"`` or ``"torch_sparse"``.
        device, dtype: factory arguments, as for ``nn.Conv2d``.

    Attributes:
        weight_kxk (Tensor[N, M/P, k, k]): grouped k x k kernels.
        weight_1x1 (Tensor[N, M - M/P]): the 1 x 1 kernels that exist, row ``j`` in increasing
            channel order (None when ``part == 1``).
        bias (Tensor[N] or None).

    Shape:
        input (Tensor[batch, M, H, W]) -> Tensor[batch, N, floor((H-1)/s)+1, floor((W-1)/s)+1]

    Raises:
        ValueError: a part that does not divide the channels, an even kernel, an unknown backend;
            at call time, an input of the wrong rank or channel count.

    Example:
        >>> layer = SparseHetConv2d(256, 256, part=4)
        >>> layer(torch.randn(2, 256, 8, 8)).shape
        torch.Size([2, 256, 8, 8])
        >>> layer.sparse_weight().shape
        torch.Size([256, 256])
    """

    _dims = 2
    _masked_type = MaskedHetConv2d


class SparseHetConv3d(_SparseHetConvNd):
    """3-D :class:`SparseHetConv2d` over ``conv3d``: input ``Tensor[batch, M, D, H, W]``,
    ``weight_kxk`` of shape ``(N, M/P, k, k, k)``."""

    _dims = 3
    _masked_type = MaskedHetConv3d
