"""The sparse HetConv: a dense grouped k x k part and only the 1 x 1 kernels that exist.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. The 1 x 1 part is stored as
the compact values of docs/design.md §3 (``N x (M - M/P)``, row ``j`` in increasing channel order);
the same values are a torch.sparse CSR matrix (:meth:`SparseHetConv2d.sparse_weight`) and a
``scipy.sparse`` CSR array (:meth:`SparseHetConv2d.to_scipy`). Because only existing kernels are
parameters, no gradient ever reaches a missing one: no masking, and any stock optimizer works.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from ._compact import _CompactHetConv
from ._probe import no_global_hooks, probe_extent, probe_input, quiet_copy, relative_change
from ._report import ConversionReport
from ._checks import centre_padding, check_int
from .backends import check_backend
from .functional import dispatch
from .layouts import read_hetconv_weights
from .masked import MaskedHetConv2d, MaskedHetConv3d

__all__ = ["SparseHetConv2d", "SparseHetConv3d", "check_reduce"]

_REDUCTIONS = ("center", "sum")


def check_reduce(reduce: object) -> str:
    """``reduce`` of :meth:`SparseHetConv2d.from_conv`: ``"center"`` or ``"sum"``."""
    if not isinstance(reduce, str) or reduce not in _REDUCTIONS:
        raise ValueError(f"reduce ({reduce!r}) must be one of {_REDUCTIONS}")
    return reduce


class _SparseHetConvNd(_CompactHetConv):
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
        padding=None,
        dilation=1,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        self._init_geometry(in_channels, out_channels, part, kernel_size, stride, padding, dilation, padding_mode)
        self.backend = backend
        self._resolved_backend: str | None = None
        self._init_parameters(bias, device, dtype)

    # -- nn.Module ----------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """How the 1 x 1 part is computed: ``"auto"`` (default), ``"dense"``, ``"grouped"``,
        ``"blocked"`` or ``"torch_sparse"``. Assign to pin one; all give the same numbers."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        value = check_backend(value)
        if value == "triton" and not self.default_geometry:
            raise ValueError(f"backend 'triton' computes padding kernel_size // 2 = {self.pattern.padding}, dilation 1 "
                             f"and padding_mode 'zeros' only, not padding={self.padding}, dilation={self.dilation}, "
                             f"padding_mode={self.padding_mode!r}; use another backend (all exact)")
        self._backend = value

    @property
    def resolved_backend(self) -> str | None:
        """The backend the last forward call actually used (what ``"auto"`` resolved to for
        that input and mode); None before the first call or when ``part == 1``. To see the choice
        for another input without running the layer, use
        :func:`sparse_hetconv.autotune.choose`; to keep it, assign it to :attr:`backend`."""
        return self._resolved_backend

    def forward(self, input: Tensor) -> Tensor:
        """Args:
            input (Tensor[batch, in_channels, *spatial]): NC(D)HW or channels-last.

        Returns:
            Tensor[batch, out_channels, *out_spatial].

        Every call reads the parameters as they are then (nothing derived from them is kept
        between calls), however they were written: optimizer steps (fused or not), ``.data``,
        ``load_state_dict``, ``torch.func.functional_call``.
        """
        self._check_input(input)
        input, padding = self._padded(input)
        out, backend = dispatch(input, self.weight_kxk, self.weight_1x1, self.bias, self.pattern, self._backend,
                                self.stride, padding, self.dilation)
        if self.part > 1:
            self._resolved_backend = backend
        return out

    def extra_repr(self) -> str:
        text = self._geometry_repr()
        if self.bias is not None:
            text += ", bias=True"
        if self._backend != "auto":
            text += f", backend={self._backend!r}"
        return text

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
                    backend, device=weight.device, dtype=weight.dtype, **read.geometry())
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
                                   self.bias is not None, device=weight.device, dtype=weight.dtype,
                                   padding=self.padding, dilation=self.dilation, padding_mode=self.padding_mode)
        with torch.no_grad():
            masked.gwc.weight.copy_(weight)
            masked.pwc.weight.copy_(self.dense_1x1().view(masked.pwc.weight.shape))
            if self.bias is not None:
                masked.gwc.bias.copy_(self.bias)
        return masked.train(self.training)

    @classmethod
    def from_conv(cls, conv: nn.Module, part: int, reduce: str = "center", backend: str = "auto",
                  return_report: bool = False):
        """Initialise a HetConv from a standard convolution, to fine-tune a pretrained CNN.

        The k x k kernels on the pattern's blocks are kept exactly; every other kernel becomes a
        1 x 1 weight: its centre tap (``reduce="center"``, the default: the part of the kernel a
        1 x 1 kernel keeps exactly) or the sum of its taps (``reduce="sum"``: the kernel's response
        to a locally constant input). The result is **exact** when the dropped taps (the
        non-centre taps of the kernels off the block diagonal) are all zero, as they are for a
        dense convolution trained under a HetConv-shaped mask (docs/design.md §4); otherwise the
        output changes and fine-tuning recovers it. ``return_report=True`` says which.

        Args:
            conv (nn.Conv2d or nn.Conv3d): ``groups=1``, an odd kernel, padding at most
                ``dilation * (k // 2)`` (``"same"``, ``"valid"`` or ints; any dilation and
                ``padding_mode``, carried over); channels divisible by ``part``.
            part (int): ``P`` of the new layer.
            reduce (str): ``"center"`` or ``"sum"``.
            backend (str): the new layer's ``backend``.
            return_report (bool): also return a :class:`~sparse_hetconv.ConversionReport`
                (converter ``"from_conv"``, the layer at path ``""``): ``report.exact``, and
                for an inexact result ``report.dropped[""] = (largest dropped |weight|,
                relative output change on a float64 probe)``.

        Returns:
            SparseHetConv2d (``3d``), or ``(layer, ConversionReport)`` with ``return_report``.
            Hooks registered on ``conv`` are not copied (the model converters carry them over).

        Raises:
            TypeError: ``conv`` is not a convolution of this dimension, or ``return_report`` is
                not a bool.
            ValueError: the convolution cannot become a HetConv (the message says why).
        """
        reason = _dense_conv_problem(conv, part, cls._dims)
        if reason:
            raise ValueError(f"cannot turn {conv} into a HetConv with part={part}: {reason}")
        reduce = check_reduce(reduce)
        check_backend(backend)
        if not isinstance(return_report, bool):
            raise TypeError(f"return_report must be a bool, got {type(return_report).__name__} ({return_report!r})")
        weight = conv.weight.detach()
        layer = cls(conv.in_channels, conv.out_channels, part, conv.kernel_size, conv.stride,
                    conv.bias is not None, backend, device=weight.device, dtype=weight.dtype, **conv_geometry(conv))
        p = layer.pattern
        n, m = p.block_out, p.block_in
        with torch.no_grad():
            for g in range(part):
                layer.weight_kxk[g * n:(g + 1) * n] = weight[g * n:(g + 1) * n, g * m:(g + 1) * m]
            if layer.weight_1x1 is not None:
                centre = (slice(None), slice(None)) + p.centre
                reduced = weight[centre] if reduce == "center" else weight.flatten(2).sum(-1)
                layer.weight_1x1.copy_(p.gather_1x1(reduced))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.train(conv.training)
        if not return_report:
            return layer
        report = ConversionReport("from_conv", replaced=[""], part=part, form="sparse",
                                  params_before=sum(t.numel() for t in conv.parameters()),
                                  params_after=sum(t.numel() for t in layer.parameters()))
        dropped = dropped_taps(weight, p)
        if dropped > 0:
            report.dropped[""] = (dropped, layer_change(conv, layer))
        return layer, report


def dropped_taps(weight: Tensor, pattern) -> float:
    """The largest ``|w|`` among the taps a HetConv of ``pattern`` does not have: the non-centre
    taps of the kernels off the block diagonal of a dense ``Tensor[N, M, *k]`` (0.0 if none)."""
    if pattern.part == 1:
        return 0.0
    off = weight.detach().abs().flatten(2).clone()
    off[..., pattern.kernel_numel // 2] = 0  # the centre tap of an odd kernel, kept as the 1 x 1 weight
    off = off.amax(-1).masked_fill(~pattern.mask_1x1(weight.device), 0)
    return float(off.max())


def layer_change(old: nn.Module, new: nn.Module) -> float:
    """``||new(x) - old(x)|| / ||old(x)||`` on a float64 probe, without firing any hook."""
    x = probe_input(new.in_channels, probe_extent(new), new.weight_kxk.device)
    with torch.no_grad(), no_global_hooks():
        return relative_change(quiet_copy(new)(x), quiet_copy(old)(x))


def conv_geometry(conv: nn.Module) -> dict:
    """A convolution's ``padding``, ``dilation`` and ``padding_mode`` as a HetConv layer takes them."""
    return {"padding": conv.padding, "dilation": tuple(conv.dilation), "padding_mode": conv.padding_mode}


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
    full = centre_padding(tuple(conv.kernel_size), tuple(conv.dilation))
    if not isinstance(conv.padding, str) and any(p > f for p, f in zip(conv.padding, full)):
        return (f"padding {tuple(conv.padding)} is more than dilation * (kernel_size // 2) = {full}: the 1x1 kernels "
                "would read the padding at the input's edges, which a HetConv's centre taps never do")
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
        backend (str): ``"auto"`` (default) or one of the backends of
            :mod:`sparse_hetconv.backends` (``"dense"``, ``"grouped"``, ``"blocked"``,
            ``"torch_sparse"``, ``"fused"``: the registered operator, 2-D, ``"triton"``: the
            operator's Triton kernel, 2-D, CUDA); all exact.
        device, dtype: factory arguments, as for ``nn.Conv2d``.
        padding (int, tuple or str): ``None`` (default) or ``"same"`` for ``dilation * (k // 2)``
            (the centre taps on the input's pixels; ``"same"`` needs stride 1, as in ``nn.Conv2d``),
            ``"valid"``, or ints down to 0 from there (the 1 x 1 part still reads the centre tap).
        dilation (int or tuple): of the k x k kernels; default 1.
        padding_mode (str): ``"zeros"`` (default), ``"reflect"``, ``"replicate"`` or
            ``"circular"``, as in ``nn.Conv2d`` (the input padded by ``F.pad``, then padding 0).

    Attributes:
        weight_kxk (Tensor[N, M/P, k, k]): grouped k x k kernels.
        weight_1x1 (Tensor[N, M - M/P]): the 1 x 1 kernels that exist, row ``j`` in increasing
            channel order (None when ``part == 1``).
        bias (Tensor[N] or None).

    Shape:
        input (Tensor[batch, M, H, W]) -> Tensor[batch, N, floor((H-1)/s)+1, floor((W-1)/s)+1]
        (the default padding; ``nn.Conv2d``'s output size in general)

    Raises:
        TypeError: a non-int channel count, part, kernel size or stride, a ``bias`` that is not a
            bool (``bias="no"`` is refused, not read as True), a ``dtype`` that is not a
            ``torch.dtype``, a ``device`` that is not a device name; at call time, an input
            that is not a tensor.
        ValueError: a part that does not divide the channels, an even kernel, a stride below 1,
            an unknown backend, an integer ``dtype``, an unknown device, a padding beyond
            ``dilation * (k // 2)`` or another string than ``"same"``/``"valid"``, ``"same"`` with a
            stride, an unknown ``padding_mode``, ``backend="triton"`` with another geometry than
            padding ``k // 2``, dilation 1 and zeros; at call time, an input of the wrong rank or
            channel count.

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
