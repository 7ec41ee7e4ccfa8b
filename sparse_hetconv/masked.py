"""The masked dense HetConv: the published "efficient" implementation, kept exact.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. The published code computes a
HetConv as ``gwc(x) + pwc(x)``: ``gwc`` a grouped k x k convolution (``groups = P``) and ``pwc`` a
full 1 x 1 convolution whose block-diagonal weights must be zero, kept zero by masking gradients
by hand in the training loop. :class:`MaskedHetConv2d` keeps that module layout (so checkpoints of
the published VGG-16 script load by key) but applies the mask inside ``forward``: the diagonal
gets exactly zero gradient, so it stays zero under any stock optimizer with no code in the loop.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ._base import _HetConvBase
from .backends._common import Call, bf16_conv_is_wrong, centre_origin, conv_kxk, crop, has_nonfinite
from .functional import dispatch

__all__ = ["MaskedHetConv2d", "MaskedHetConv3d"]

_CONV_TYPES = {2: nn.Conv2d, 3: nn.Conv3d}


class _MaskedHetConvNd(_HetConvBase):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        part: int,
        kernel_size=3,
        stride=1,
        bias: bool = False,
        device=None,
        dtype=None,
        padding=None,
        dilation=1,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        self._init_geometry(in_channels, out_channels, part, kernel_size, stride, padding, dilation, padding_mode)
        self._check_factory(bias, device, dtype)
        conv = _CONV_TYPES[self._dims]
        factory = {"device": device, "dtype": dtype}
        self.gwc = conv(in_channels, out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
                        groups=part, bias=bias, padding_mode=self.padding_mode, **factory)
        self.pwc = conv(in_channels, out_channels, 1, self.stride, bias=False, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in ``+-1/sqrt(fan_in)`` over the filter's real fan-in; the diagonal zero."""
        bound = self._init_bound()
        with torch.no_grad():
            self.gwc.weight.uniform_(-bound, bound)
            self.pwc.weight.uniform_(-bound, bound)
            self.pwc.weight.view(self.out_channels, self.in_channels).masked_fill_(
                ~self.pattern.mask_1x1(self.pwc.weight.device), 0
            )
            if self.gwc.bias is not None:
                self.gwc.bias.uniform_(-bound, bound)

    def masked_1x1(self) -> Tensor:
        """``pwc``'s weight with the block diagonal replaced by zeros, as used by ``forward``.

        Selected (``torch.where``), not multiplied by the mask: whatever the diagonal holds, NaN and
        ``inf`` included, never reaches the output (``nan * 0`` is NaN), and its gradient there is
        exactly zero (docs/design.md §9).

        Returns:
            Tensor[out_channels, in_channels, 1, ...]: ``pwc.weight``'s shape.
        """
        weight = self.pwc.weight
        mask = self.pattern.mask_1x1(weight.device).view(weight.shape)
        return torch.where(mask, weight, 0)

    def forward(self, input: Tensor) -> Tensor:
        """Args:
            input (Tensor[batch, in_channels, *spatial]): NC(D)HW or channels-last.

        Returns:
            Tensor[batch, out_channels, *out_spatial]: ``gwc(input) + pwc(input)`` with ``pwc``'s
            block diagonal left out (:meth:`masked_1x1`).

        Like the published code this multiplies the zeros of the block diagonal, and ``0 * inf``
        is NaN where the definition adds nothing. An eager call on the CPU whose input holds a
        non-finite value therefore computes the 1 x 1 part from ``pwc``'s existing kernels only (the
        sparse form's ``blocked`` backend), which gives the definition's answer and the same
        gradients; under graph capture and on CUDA, where that check would cost a graph break or a
        device synchronisation, an ``inf`` on a channel of filter ``j``'s own block makes filter
        ``j``'s output NaN at that pixel where the definition has ``+-inf`` (docs/design.md §9).
        """
        self._check_input(input)
        if has_nonfinite(input):
            return self._definition_forward(input)
        kxk = self._gwc(input)
        # pwc reads the input at gwc's centre taps: from the first output pixel's centre on (the
        # input itself unless the padding is less than dilation * (k // 2)), cropped to gwc's size.
        call = Call.of(self.pattern, self.stride, self.padding, self.dilation)
        pwc = self.pwc._conv_forward(centre_origin(input, call), self.masked_1x1(), self.pwc.bias)
        return kxk + crop(pwc, kxk.shape[2:])

    def _gwc(self, input: Tensor) -> Tensor:
        """``gwc(input)``, in float32 where oneDNN gets it wrong in bfloat16
        (:func:`~sparse_hetconv.ops.stock.bf16_conv_is_wrong`)."""
        gwc = self.gwc
        if not bf16_conv_is_wrong(input, self.stride):
            return gwc(input)  # through the module, so that its hooks (FLOP counters) see it
        input, padding = self._padded(input)
        return conv_kxk(input, gwc.weight, gwc.bias, self.stride, padding, self.part, self.dilation)

    def _definition_forward(self, input: Tensor) -> Tensor:
        """The layer from its existing kernels only: ``pwc``'s block diagonal is never read."""
        weight = self.pwc.weight
        values = self.pattern.gather_1x1(weight.reshape(self.out_channels, self.in_channels))
        bias = self.gwc.bias
        if self.pwc.bias is not None:
            bias = self.pwc.bias if bias is None else bias + self.pwc.bias
        input, padding = self._padded(input)
        return dispatch(input, self.gwc.weight, values, bias, self.pattern, "blocked", self.stride, padding,
                        self.dilation)[0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint whose pwc diagonal is not zero (an "approximate HetConv" trained without
        # masking) is folded into gwc's centre taps on load: the module then computes exactly
        # what the checkpoint's gwc(x) + pwc(x) computed, and the diagonal is zero again.
        gwc_key, pwc_key = prefix + "gwc.weight", prefix + "pwc.weight"
        gwc, pwc = state_dict.get(gwc_key), state_dict.get(pwc_key)
        if (
            isinstance(gwc, Tensor)
            and isinstance(pwc, Tensor)
            and gwc.shape == self.gwc.weight.shape
            and pwc.shape == self.pwc.weight.shape
        ):
            dense = pwc.reshape(self.out_channels, self.in_channels)
            diagonal = self.pattern.block_diagonal(dense)
            where = f"{type(self).__name__} at '{prefix.rstrip('.') or '<root>'}'"
            if not bool(torch.isfinite(diagonal).all()):
                # Not a weight of any kernel (docs/design.md §9): folding inf/NaN into the centre
                # taps would poison the filter; those entries are dropped, the finite rest folded.
                warnings.warn(f"{where}: the checkpoint's pwc weight holds inf or NaN on the block diagonal, "
                              "where the pattern has no 1x1 kernel; set those entries to zero (not folded)",
                              stacklevel=2)
                dense = dense.masked_fill(~self.pattern.mask_1x1(dense.device) & ~torch.isfinite(dense), 0)
                diagonal = self.pattern.block_diagonal(dense)
                state_dict[pwc_key] = dense.view(pwc.shape)
            if bool((diagonal != 0).any()):
                warnings.warn(
                    f"{where}: the checkpoint's "
                    "pwc weight is non-zero on the block diagonal; folded it into gwc's centre "
                    "taps (exact: the layer computes what gwc(x) + pwc(x) computed)",
                    stacklevel=2,
                )
                kxk, dense = self.pattern.fold(gwc, dense)
                state_dict[gwc_key] = kxk
                state_dict[pwc_key] = dense.view(pwc.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        text = self._geometry_repr()
        if self.gwc.bias is not None:
            text += ", bias=True"
        return text


class MaskedHetConv2d(_MaskedHetConvNd):
    """HetConv in the published masked dense form: ``gwc(x) + pwc(x)``.

    ``gwc`` is ``nn.Conv2d(M, N, k, stride, padding=k // 2, groups=P)`` (with the layer's padding,
    dilation and padding mode when given) and ``pwc`` is ``nn.Conv2d(M, N, 1, stride)``, read at
    ``gwc``'s centre taps, whose block-diagonal weights (filter ``j``, channels of its
    block) start at zero; ``forward`` multiplies them by the pattern mask, so they get exactly
    zero gradient and stay zero under SGD (momentum, weight decay), Adam and AdamW with nothing
    added to the training loop. The layer still stores and computes ``N * M / P`` useless 1 x 1
    weights; :class:`SparseHetConv2d` is the same layer without them (``to_sparse``).

    Loading a ``state_dict`` whose ``pwc`` diagonal is non-zero folds it into ``gwc``'s centre
    taps with a warning (exact, docs/design.md §4); an inf or NaN there, which no kernel holds,
    is set to zero with a warning instead (§9), and the finite rest of the diagonal is folded.

    Args:
        in_channels (int): ``M``.
        out_channels (int): ``N``.
        part (int): ``P``; ``M`` and ``N`` must be divisible by it.
        kernel_size (int or tuple): odd k; default 3.
        stride (int or tuple): stride of both parts; default 1.
        bias (bool): add a learnable bias (held by ``gwc``); default False.
        device, dtype: factory arguments, as for ``nn.Conv2d``.
        padding (int, tuple or str): ``None`` (default) or ``"same"`` for ``dilation * (k // 2)``
            (the centre taps on the input's pixels; ``"same"`` needs stride 1, as in ``nn.Conv2d``),
            ``"valid"``, or ints down to 0 from there (the 1 x 1 part still reads the centre tap).
        dilation (int or tuple): of the k x k kernels; default 1.
        padding_mode (str): ``"zeros"`` (default), ``"reflect"``, ``"replicate"`` or
            ``"circular"``, as in ``nn.Conv2d`` (the input padded by ``F.pad``, then padding 0).

    Shape:
        input (Tensor[batch, M, H, W]) -> Tensor[batch, N, floor((H-1)/s)+1, floor((W-1)/s)+1]

    Raises:
        TypeError / ValueError: as :class:`SparseHetConv2d`'s constructor (``bias`` must be a
            bool, ``dtype`` a floating-point or complex ``torch.dtype``), before anything is built.

    Example:
        >>> layer = MaskedHetConv2d(64, 128, part=4)
        >>> layer(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 128, 8, 8])
    """

    _dims = 2


class MaskedHetConv3d(_MaskedHetConvNd):
    """3-D :class:`MaskedHetConv2d` over ``conv3d``: input ``Tensor[batch, M, D, H, W]``."""

    _dims = 3
