"""HetConv for spatially sparse inputs: submanifold HetConv layers over spconv tensors.

spconv (https://github.com/traveller59/spconv) runs CNNs on point clouds and voxel grids, where
features exist only at *active sites* (a ``spconv.pytorch.SparseConvTensor``). :class:`SubMHetConv3d`
and :class:`SubMHetConv2d` keep the input's active sites, and at each equal the dense HetConv
(:class:`SparseHetConv3d`) on the grid with zeros elsewhere. spconv has no ``groups``: the k x k part
runs as ``chunks`` submanifold convolutions sharing one ``indice_key``, each block-diagonal over its
``P/Q`` channel blocks, and the 1 x 1 part is one product with the ``(sites, M)`` features, its
in-chunk weights folded into the centre taps (docs/design.md §7, exact). By default the layer uses
the most chunks that keep at least 16 channels per chunk (``benchmarks/bench_spconv.py``).

spconv is an optional dependency (``pip install sparse_hetconv[spconv]``); ``import sparse_hetconv``
never imports it.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    with warnings.catch_warnings():  # spconv's import-time torch.cuda.amp deprecation warnings
        warnings.simplefilter("ignore", FutureWarning)
        import spconv.pytorch as spconv_pt
        from spconv.core import ConvAlgo
        from spconv.pytorch.conv import SparseConvolutionBase
except ImportError as error:
    raise ImportError(
        f"sparse_hetconv.submanifold needs the spconv package, which could not be imported ({error}); "
        "install it with: pip install sparse_hetconv[spconv]"
    ) from error

from ._checks import check_int, check_tuple
from ._compact import _CompactHetConv
from .convert import _convert, _looks_published, to_sparse
from .pattern import HetConvPattern
from .sparse import SparseHetConv2d, SparseHetConv3d, _SparseHetConvNd

__all__ = [
    "SubMHetConv2d",
    "SubMHetConv3d",
    "default_chunks",
    "from_submanifold",
    "submanifold_weights",
    "to_submanifold",
]

#: Narrowest chunk (in input and output channels) the automatic choice allows.
MIN_CHUNK_CHANNELS = 16
# Shares the index pairs between the chunks of one call when the layer has no indice_key; it is
# removed from the output, so it never reaches another layer.
_CHUNK_KEY = "sparse_hetconv.chunks"


def default_chunks(pattern: HetConvPattern) -> int:
    """The number of chunks a layer uses when ``chunks`` is None.

    The largest divisor ``Q`` of ``part`` with ``min(in_channels, out_channels) / Q >= 16``
    (:data:`MIN_CHUNK_CHANNELS`), or 1. On the CPU spconv gathers and scatters one feature row
    per index pair and per chunk; below 16 channels a chunk costs more in rows than it saves in
    multiply-adds.
    """
    width, best = min(pattern.in_channels, pattern.out_channels), 1
    for q in range(2, pattern.part + 1):
        if pattern.part % q == 0 and width // q >= MIN_CHUNK_CHANNELS:
            best = q
    return best


def submanifold_weights(pattern: HetConvPattern, weight_kxk: Tensor, weight_1x1: Tensor | None,
                        chunks: int) -> tuple[Tensor, Tensor | None]:
    """The weights of the ``chunks`` spconv convolutions and of the remaining 1 x 1 product.

    Differentiable: gradients flow back to ``weight_kxk`` and ``weight_1x1`` only.

    Args:
        pattern (HetConvPattern): the layer's pattern (``M``, ``N``, ``P``, kernel).
        weight_kxk (Tensor[N, M/P, *kernel_size]): PyTorch's layout.
        weight_1x1 (Tensor[N, M - M/P] or None): the compact 1 x 1 values.
        chunks (int): ``Q``, a divisor of ``P``.

    Returns:
        (Tensor[Q, N/Q, *kernel_size, M/Q], Tensor[N, M] or None): per chunk a weight in spconv's
        ``(out, *kernel, in)`` layout, block-diagonal over the chunk's ``P/Q`` blocks, with the
        chunk's own 1 x 1 weights added to its centre tap; and the 1 x 1 weights outside the
        chunks' squares as a dense matrix (None when there are none).
    """
    p, n, m, q = pattern.part, pattern.block_out, pattern.block_in, chunks
    blocks, taps = p // q, pattern.kernel_numel
    grouped = weight_kxk.reshape(q, blocks, n, m, taps)
    if blocks == 1:  # one block per chunk: only spconv's layout to make
        full = grouped.squeeze(1).transpose(2, 3)
    else:  # block-diagonal over the chunk's blocks
        eye = torch.eye(blocks, dtype=weight_kxk.dtype, device=weight_kxk.device)
        full = torch.einsum("qgnmt,gh->qgnthm", grouped, eye).reshape(q, blocks * n, taps, blocks * m)
    outside = None
    if weight_1x1 is not None:
        dense = pattern.scatter_1x1(weight_1x1).view(q, blocks * n, q, blocks * m)
        inside = torch.diagonal(dense, dim1=0, dim2=2).permute(2, 0, 1)  # (Q, N/Q, M/Q)
        centre = taps // 2  # the flattened centre tap of an odd kernel
        full = full + F.pad(inside.unsqueeze(2), (0, 0, centre, taps - 1 - centre))
        if q > 1:
            own = torch.eye(q, dtype=torch.bool, device=dense.device)[:, None, :, None]
            outside = dense.masked_fill(own, 0).view(pattern.out_channels, pattern.in_channels)
    return full.reshape((q, blocks * n) + pattern.kernel_size + (blocks * m,)).contiguous(), outside


def _optional(name: str, value, kind: type, expected: str):
    if value is not None and not isinstance(value, kind):
        raise TypeError(f"{name} must be {expected} or None, got {type(value).__name__} ({value!r})")
    return value


class _SubMHetConvNd(_CompactHetConv):
    _dense_type: type

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        part: int,
        kernel_size=3,
        stride=1,
        bias: bool = False,
        chunks: int | None = None,
        device=None,
        dtype=None,
        *,
        indice_key: str | None = None,
        algo: ConvAlgo | None = None,
    ) -> None:
        super().__init__()
        if check_tuple("stride", stride, self._dims) != (1,) * self._dims:
            raise ValueError(f"stride ({stride!r}) must be 1: a submanifold convolution keeps the input's active "
                             "sites, which only a stride-1 layer does")
        self._init_geometry(in_channels, out_channels, part, kernel_size, 1)
        self.indice_key = indice_key
        self.algo = algo
        self.chunks = chunks
        self._init_parameters(bias, device, dtype)

    # -- settings -----------------------------------------------------------------------------
    @property
    def indice_key(self) -> str | None:
        """spconv's key for the index pairs: layers (spconv's too) given the same key on tensors
        with the same sites compute the pairs once. None keeps them to this call."""
        return self._indice_key

    @indice_key.setter
    def indice_key(self, value: str | None) -> None:
        self._indice_key = _optional("indice_key", value, str, "a str")

    @property
    def algo(self) -> ConvAlgo | None:
        """spconv's algorithm. None: ``ConvAlgo.Native`` on the CPU (the only one spconv runs
        there), spconv's own choice on CUDA."""
        return self._algo

    @algo.setter
    def algo(self, value: ConvAlgo | None) -> None:
        self._algo = _optional("algo", value, ConvAlgo, "a spconv.core.ConvAlgo")

    @property
    def chunks(self) -> int | None:
        """How many spconv convolutions run the k x k part (a divisor of ``part``); None picks
        :func:`default_chunks`. All choices give the same numbers."""
        return self._chunks

    @chunks.setter
    def chunks(self, value: int | None) -> None:
        if value is not None:
            check_int("chunks", value)
            if self.part % value:
                raise ValueError(f"chunks ({value}) must divide part ({self.part})")
        self._chunks = value

    # -- forward ------------------------------------------------------------------------------
    def forward(self, input: "spconv_pt.SparseConvTensor") -> "spconv_pt.SparseConvTensor":
        """Args:
            input (SparseConvTensor): features ``Tensor[sites, in_channels]`` at ``sites`` active
                sites (indices ``Tensor[sites, 1 + dims]``, int32: batch, then coordinates).

        Returns:
            SparseConvTensor: features ``Tensor[sites, out_channels]`` at the same sites, in the
            same order.

        Raises:
            TypeError: ``input`` is not a SparseConvTensor, or its dtype is not the layer's.
            ValueError: wrong channel count, dimension, device or algo, or an ``indice_key``
                whose stored pairs do not fit this layer.
        """
        x = self._check_sparse_input(input)
        features = x.features
        chunks = self._chunks or default_chunks(self.pattern)
        key = self._indice_key or (_CHUNK_KEY if chunks > 1 else None)
        conv = SparseConvolutionBase(self._dims, self.in_channels // chunks, self.out_channels // chunks,
                                     self.kernel_size, subm=True, bias=False, indice_key=key,
                                     algo=self._resolve_algo(features))
        self._check_stored_pairs(x, key, conv.algo)
        weights, outside = submanifold_weights(self.pattern, self.weight_kxk, self.weight_1x1, chunks)
        params = (self.weight_kxk, self.weight_1x1, self.bias)
        training = self.training or (torch.is_grad_enabled() and (
            features.requires_grad or any(p is not None and p.requires_grad for p in params)))
        width, outs, current = self.in_channels // chunks, [], x
        for q in range(chunks):
            part = features if chunks == 1 else features[:, q * width:(q + 1) * width]
            current = conv._conv_forward(training, current.replace_feature(part), weights[q], None)
            outs.append(current.features)
        y = outs[0] if chunks == 1 else torch.cat(outs, dim=1)
        if outside is not None:
            y = y + F.linear(features, outside)
        if self.bias is not None:
            y = y + self.bias
        out = current.replace_feature(y)
        if key == _CHUNK_KEY:
            out.indice_dict = {k: v for k, v in current.indice_dict.items() if k != _CHUNK_KEY}
        return out

    def _check_sparse_input(self, input) -> "spconv_pt.SparseConvTensor":
        who, dims = type(self).__name__, self._dims
        if not isinstance(input, spconv_pt.SparseConvTensor):
            hint = ""
            if isinstance(input, Tensor):
                hint = f"; for a dense tensor use {self._dense_type.__name__} ({who}.to_dense() gives it)"
            raise TypeError(f"{who} expects a spconv.pytorch.SparseConvTensor, got {type(input).__name__}{hint}")
        features, indices = input.features, input.indices
        if indices.dim() != 2 or indices.shape[1] != dims + 1:
            raise ValueError(f"{who} expects {dims}-D sites (indices of shape (sites, {dims + 1}): batch and "
                             f"{dims} coordinates), got indices of shape {tuple(indices.shape)}")
        if features.dim() != 2 or features.shape[1] != self.in_channels:
            raise ValueError(f"{who} expects features of shape (sites, {self.in_channels}) ({self.in_channels} "
                             f"channels), got {tuple(features.shape)}")
        if features.shape[0] != indices.shape[0]:
            raise ValueError(f"{who}: the input has {features.shape[0]} feature rows but {indices.shape[0]} sites")
        weight = self.weight_kxk
        if features.dtype != weight.dtype:
            raise TypeError(f"{who} has {weight.dtype} weights but the input features are {features.dtype}")
        if features.device != weight.device:
            raise ValueError(f"{who} is on {weight.device} but the input features are on {features.device}")
        if indices.is_contiguous():
            return input
        # spconv reads the index memory as row-major whatever its strides: torch.nonzero, for one,
        # returns column-major indices, which spconv's own layers silently misread.
        x = input.shadow_copy()
        x.indices = indices.contiguous()
        return x

    def _resolve_algo(self, features: Tensor) -> ConvAlgo | None:
        if features.device.type == "cuda":
            return self._algo
        if self._algo not in (None, ConvAlgo.Native):
            raise ValueError(f"algo ({self._algo}) runs only on CUDA; on {features.device} spconv "
                             "runs ConvAlgo.Native (leave algo=None to pick it)")
        return ConvAlgo.Native

    def _check_stored_pairs(self, x, key: str | None, algo: ConvAlgo) -> None:
        stored = x.find_indice_pair(key)
        if stored is None:
            return
        problem = None
        if not stored.is_subm:
            problem = "of a non-submanifold convolution"
        elif list(stored.ksize) != list(self.kernel_size):
            problem = f"for kernel_size {tuple(stored.ksize)}, not {self.kernel_size}"
        elif stored.algo != algo:
            problem = f"made by {stored.algo}, not {algo}"
        if problem:
            raise ValueError(f"{type(self).__name__}: indice_key {key!r} holds index pairs {problem}; layers "
                             "sharing an indice_key need the same sites, kernel size and algo")

    def extra_repr(self) -> str:
        text = self._geometry_repr()
        if self.bias is not None:
            text += ", bias=True"
        for name in ("indice_key", "algo", "chunks"):
            if getattr(self, name) is not None:
                text += f", {name}={getattr(self, name)!r}"
        return text

    # -- conversions --------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, module: nn.Module, indice_key: str | None = None, algo: ConvAlgo | None = None,
                   chunks: int | None = None) -> "_SubMHetConvNd":
        """The submanifold layer with the weights of a dense-input HetConv of the same dimension.

        At the active sites its output equals ``module`` applied to the dense grid with zeros at
        the inactive sites. ``module`` is copied, not changed; the new layer has its device, dtype
        and train/eval state.

        Args:
            module (nn.Module): a :class:`SparseHetConv3d` (``2d`` for :class:`SubMHetConv2d`),
                or a masked / published ``gwc``/``pwc`` HetConv (read exactly, as by
                :func:`sparse_hetconv.to_sparse`). Its stride must be 1.
            indice_key, algo, chunks: settings of the new layer.

        Raises:
            TypeError: ``module`` is not a HetConv.
            ValueError: another dimension, or a stride other than 1 (a submanifold convolution
                keeps the active sites, which only a stride-1 layer does), or a dilation, padding
                or padding mode other than HetConv's default (not computed there).
        """
        dense = module
        if not isinstance(dense, _SparseHetConvNd):
            if not isinstance(module, nn.Module) or not _looks_published(module):
                raise TypeError(f"{cls.__name__}.from_dense expects a HetConv layer ({cls._dense_type.__name__} "
                                f"or a masked one), got {type(module).__name__}")
            dense = to_sparse(module)
        if dense._dims != cls._dims:
            raise ValueError(f"{cls.__name__}.from_dense expects a {cls._dims}-D HetConv, got a {dense._dims}-D "
                             f"one ({type(module).__name__})")
        if any(s != 1 for s in dense.stride):
            raise ValueError(f"stride ({dense.stride}) of {type(module).__name__} must be 1: a submanifold "
                             "convolution keeps the input's active sites, which only a stride-1 layer does")
        if not dense.default_geometry:
            raise ValueError(f"{type(module).__name__} has padding {dense.padding}, dilation {dense.dilation} and "
                             f"padding_mode {dense.padding_mode!r}: a submanifold convolution computes padding "
                             "kernel_size // 2, dilation 1 and zero padding only")
        weight = dense.weight_kxk
        layer = cls(dense.in_channels, dense.out_channels, dense.part, dense.kernel_size, 1, dense.bias is not None,
                    chunks, device=weight.device, dtype=weight.dtype, indice_key=indice_key, algo=algo)
        layer._copy_parameters(dense)
        return layer.train(module.training)

    def to_dense(self, backend: str = "auto") -> nn.Module:
        """The dense-input :class:`SparseHetConv3d` (``2d``) with the same weights: the exact
        inverse of :meth:`from_dense`, on the same device, dtype and train/eval state."""
        weight = self.weight_kxk
        dense = self._dense_type(self.in_channels, self.out_channels, self.part, self.kernel_size, 1,
                                 self.bias is not None, backend, device=weight.device, dtype=weight.dtype)
        dense._copy_parameters(self)
        return dense.train(self.training)


class SubMHetConv3d(_SubMHetConvNd):
    """Submanifold HetConv on a 3-D ``spconv.pytorch.SparseConvTensor``.

    Each of the ``N`` filters has ``M/P`` k x k x k kernels (on its group's block of channels) and
    ``M - M/P`` 1 x 1 x 1 kernels, as in :class:`sparse_hetconv.SparseHetConv3d`; the output has
    the input's active sites, and at each it equals that dense layer applied to the grid with
    zeros at the inactive sites. Runs on spconv's kernels (module docstring).

    Args:
        in_channels (int): ``M``.
        out_channels (int): ``N``.
        part (int): ``P``; ``M`` and ``N`` must be divisible by it. ``P = 1`` is spconv's
            ``SubMConv3d`` (``weight_1x1`` is None).
        kernel_size (int or tuple): odd k; default 3.
        stride (int or tuple): must be 1 (a submanifold convolution keeps its input's sites);
            there to keep :class:`SparseHetConv3d`'s argument order.
        bias (bool): add a learnable bias; default False.
        chunks (int, optional): spconv convolutions for the k x k part, a divisor of ``part``;
            None: :func:`default_chunks` (the counterpart of the dense layer's ``backend``).
        device, dtype: factory arguments, as for ``nn.Conv3d``.
        indice_key (str, optional, keyword-only): spconv's key for sharing index pairs between
            layers.
        algo (spconv.core.ConvAlgo, optional, keyword-only): None for ``ConvAlgo.Native`` on the
            CPU and spconv's choice on CUDA.

    Attributes:
        weight_kxk (Tensor[N, M/P, k, k, k]): grouped kernels in PyTorch's layout (spconv's
            ``(out, k, k, k, in)`` layout is made from it in ``forward``).
        weight_1x1 (Tensor[N, M - M/P]): the 1 x 1 kernels that exist, row ``j`` in increasing
            channel order (None when ``part == 1``); :meth:`sparse_weight` is the CSR view.
        bias (Tensor[N] or None).

    Shape:
        features (Tensor[sites, M]) -> Tensor[sites, N], same indices and spatial shape.

    Example:
        >>> import spconv.pytorch as spconv_pt
        >>> indices = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 4]], dtype=torch.int32)
        >>> x = spconv_pt.SparseConvTensor(torch.randn(2, 16), indices, [8, 8, 8], batch_size=1)
        >>> SubMHetConv3d(16, 32, part=4)(x).features.shape
        torch.Size([2, 32])
    """

    _dims = 3
    _dense_type = SparseHetConv3d


class SubMHetConv2d(_SubMHetConvNd):
    """2-D :class:`SubMHetConv3d`: sites with indices ``(batch, y, x)``, ``weight_kxk`` of shape
    ``(N, M/P, k, k)``; the dense twin is :class:`sparse_hetconv.SparseHetConv2d`."""

    _dims = 2
    _dense_type = SparseHetConv2d


_SUBM_BY_DIMS = {2: SubMHetConv2d, 3: SubMHetConv3d}


def to_submanifold(model: nn.Module, inplace: bool = False, indice_key: str | None = None,
                   algo: ConvAlgo | None = None) -> nn.Module:
    """Replace every dense-input HetConv in ``model`` by its submanifold twin (same weights).

    Converted: :class:`SparseHetConv2d` / ``3d`` and masked or published ``gwc``/``pwc`` HetConvs,
    all of stride 1. Only the HetConv layers change: the model runs on SparseConvTensors only if
    its other layers do too (spconv's ``SparseSequential``, or layers applied to ``.features``).

    Args:
        model (nn.Module): the model (or a single layer).
        inplace (bool): change ``model`` itself instead of a deep copy.
        indice_key (str, optional): given to every new layer. Only right where all of them see
            the same sites with the same kernel size, as in a network of submanifold layers.
        algo (spconv.core.ConvAlgo, optional): given to every new layer.

    Returns:
        nn.Module: the converted model.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a HetConv with a stride other than 1; ``model`` is left untouched.
    """

    def build(path, module):
        if not (isinstance(module, _SparseHetConvNd) or _looks_published(module)):
            return None
        try:
            dense = module if isinstance(module, _SparseHetConvNd) else to_sparse(module)
            return _SUBM_BY_DIMS[dense._dims].from_dense(dense, indice_key, algo)
        except ValueError as error:
            raise ValueError(f"module '{path or '<root>'}': {error}") from error

    return _convert(model, build, inplace, "to_submanifold")


def from_submanifold(model: nn.Module, inplace: bool = False, backend: str = "auto") -> nn.Module:
    """The inverse of :func:`to_submanifold`: every :class:`SubMHetConv2d` / ``3d`` becomes a
    dense-input :class:`SparseHetConv2d` / ``3d`` with the same weights (``backend`` of the new
    layers). Copies unless ``inplace=True``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """

    def build(path, module):
        return module.to_dense(backend) if isinstance(module, _SubMHetConvNd) else None

    return _convert(model, build, inplace, "from_submanifold")
