"""What every HetConv layer with compact weights shares: its parameters and views of the 1 x 1 part.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. A layer of this family holds
``weight_kxk`` (``N x M/P x k x k [x k]``), the compact 1 x 1 values ``weight_1x1``
(``N x (M - M/P)``, row ``j`` in increasing channel order; docs/design.md §3) and an optional
``bias``. :class:`sparse_hetconv.SparseHetConv2d` (dense inputs) and the submanifold layers of
:mod:`sparse_hetconv.submanifold` (spatially sparse inputs) differ only in how they compute with them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ._base import _HetConvBase

if TYPE_CHECKING:  # scipy is imported by the two methods that use it, not by ``import sparse_hetconv``
    import scipy.sparse


class _CompactHetConv(_HetConvBase):
    """Parameters ``weight_kxk``, ``weight_1x1`` (None when ``part == 1``) and ``bias``; the 1 x 1
    part as a dense, torch.sparse or scipy matrix. Subclasses call :meth:`_init_geometry`, then
    :meth:`_init_parameters`."""

    def _init_parameters(self, bias: bool, device=None, dtype=None) -> None:
        self._check_factory(bias, device, dtype)
        factory = {"device": device, "dtype": dtype}
        p = self.pattern
        self.weight_kxk = nn.Parameter(torch.empty((self.out_channels, p.block_in) + p.kernel_size, **factory))
        if self.part > 1:
            self.weight_1x1 = nn.Parameter(torch.empty((self.out_channels, p.num_1x1), **factory))
        else:
            self.register_parameter("weight_1x1", None)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def _copy_parameters(self, other: "_CompactHetConv") -> None:
        """Copy ``other``'s parameters (same pattern and bias setting) into this layer."""
        with torch.no_grad():
            for name in ("weight_kxk", "weight_1x1", "bias"):
                mine = getattr(self, name)
                if mine is not None:
                    mine.copy_(getattr(other, name))

    def reset_parameters(self) -> None:
        """Uniform in ``+-1/sqrt(fan_in)``, ``fan_in = k^2 m + M - m`` (``nn.ConvNd``'s default
        bound over the kernels that exist)."""
        bound = self._init_bound()
        for param in (self.weight_kxk, self.weight_1x1, self.bias):
            if param is not None:
                nn.init.uniform_(param, -bound, bound)

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
            return p.csr(values)
        if layout == torch.sparse_coo:
            rows = torch.arange(self.out_channels, device=device).repeat_interleave(p.num_1x1)
            indices = torch.stack([rows, p.col_indices(device)])
            return torch.sparse_coo_tensor(indices, values.reshape(-1), size=shape, is_coalesced=True,
                                           check_invariants=False)
        raise ValueError(f"layout ({layout}) must be torch.sparse_csr or torch.sparse_coo")

    def to_scipy(self) -> "scipy.sparse.csr_array":
        """The 1 x 1 part as a ``scipy.sparse.csr_array`` of shape ``(out_channels, in_channels)``
        (a copy on the host; bfloat16 and float16 values become float32)."""
        import scipy.sparse

        p, values = self.pattern, self._values().cpu()
        if values.dtype in (torch.bfloat16, torch.float16):
            values = values.float()
        return scipy.sparse.csr_array(
            (values.reshape(-1).numpy().copy(), p.col_indices().numpy().copy(), p.crow_indices().numpy().copy()),
            shape=(self.out_channels, self.in_channels),
        )

    def load_scipy(self, matrix) -> "_CompactHetConv":
        """Load the 1 x 1 part from a ``scipy.sparse`` matrix, in place; returns ``self``.

        Entries missing from the matrix are zero weights. Stored entries on the block diagonal
        must be zero: a non-zero one does not fit the HetConv pattern (``weight_kxk`` is untouched
        either way; to fold such a matrix into the centre taps, use :func:`to_sparse` on a module).
        Nothing is changed when the matrix is refused.

        Raises:
            TypeError: ``matrix`` is not a scipy sparse matrix or array.
            ValueError: wrong shape, or a non-zero entry where the pattern has no 1 x 1 kernel.
        """
        import numpy as np
        import scipy.sparse

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
