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
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ._base import _HetConvBase
from .backends._common import bf16_conv_is_wrong, conv_kxk, has_nonfinite
from .functional import _het_conv, needs_grad
from .pattern import HetConvPattern

__all__ = ["MaskedHetConv2d", "MaskedHetConv3d", "HetConvWeights", "read_hetconv_weights"]

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
    ) -> None:
        super().__init__()
        self._init_geometry(in_channels, out_channels, part, kernel_size, stride)
        conv = _CONV_TYPES[self._dims]
        factory = {"device": device, "dtype": dtype}
        self.gwc = conv(in_channels, out_channels, self.kernel_size, self.stride, self.padding,
                        groups=part, bias=bias, **factory)
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
        pwc = self.pwc._conv_forward(input, self.masked_1x1(), self.pwc.bias)
        return self._gwc(input) + pwc

    def _gwc(self, input: Tensor) -> Tensor:
        """``gwc(input)``, in float32 where oneDNN gets it wrong in bfloat16
        (:func:`~sparse_hetconv.backends._common.bf16_conv_is_wrong`)."""
        gwc = self.gwc
        if not bf16_conv_is_wrong(input, self.stride):
            return gwc(input)  # through the module, so that its hooks (FLOP counters) see it
        return conv_kxk(input, gwc.weight, gwc.bias, self.stride, self.padding, self.part)

    def _definition_forward(self, input: Tensor) -> Tensor:
        """The layer from its existing kernels only: ``pwc``'s block diagonal is never read."""
        weight = self.pwc.weight
        values = self.pattern.gather_1x1(weight.reshape(self.out_channels, self.in_channels))
        bias = self.gwc.bias
        if self.pwc.bias is not None:
            bias = self.pwc.bias if bias is None else bias + self.pwc.bias
        grad = needs_grad(input, self.gwc.weight, weight, bias)
        return _het_conv(input, self.gwc.weight, values, bias, self.stride, self.pattern, "blocked", grad)

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
            if bool((self.pattern.block_diagonal(dense) != 0).any()):
                warnings.warn(
                    f"{type(self).__name__} at '{prefix.rstrip('.') or '<root>'}': the checkpoint's "
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

    ``gwc`` is ``nn.Conv2d(M, N, k, stride, padding=k // 2, groups=P)`` and ``pwc`` is
    ``nn.Conv2d(M, N, 1, stride)`` whose block-diagonal weights (filter ``j``, channels of its
    block) start at zero; ``forward`` multiplies them by the pattern mask, so they get exactly
    zero gradient and stay zero under SGD (momentum, weight decay), Adam and AdamW with nothing
    added to the training loop. The layer still stores and computes ``N * M / P`` useless 1 x 1
    weights; :class:`SparseHetConv2d` is the same layer without them (``to_sparse``).

    Loading a ``state_dict`` whose ``pwc`` diagonal is non-zero folds it into ``gwc``'s centre
    taps with a warning (exact, docs/design.md §4).

    Args:
        in_channels (int): ``M``.
        out_channels (int): ``N``.
        part (int): ``P``; ``M`` and ``N`` must be divisible by it.
        kernel_size (int or tuple): odd k; default 3.
        stride (int or tuple): stride of both parts; default 1.
        bias (bool): add a learnable bias (held by ``gwc``); default False.
        device, dtype: factory arguments, as for ``nn.Conv2d``.

    Shape:
        input (Tensor[batch, M, H, W]) -> Tensor[batch, N, floor((H-1)/s)+1, floor((W-1)/s)+1]

    Example:
        >>> layer = MaskedHetConv2d(64, 128, part=4)
        >>> layer(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 128, 8, 8])
    """

    _dims = 2


class MaskedHetConv3d(_MaskedHetConvNd):
    """3-D :class:`MaskedHetConv2d` over ``conv3d``: input ``Tensor[batch, M, D, H, W]``."""

    _dims = 3


class HetConvWeights(NamedTuple):
    """The exact HetConv content of a module: what every form of the layer is built from."""

    pattern: HetConvPattern
    stride: tuple[int, ...]
    weight_kxk: Tensor  # (N, m, *kernel_size), block diagonal of the 1x1 part folded in
    dense_1x1: Tensor  # (N, M) with a zero block diagonal
    bias: Tensor | None


def read_hetconv_weights(module: nn.Module, path: str = "") -> HetConvWeights:
    """Read a masked HetConv, or any module shaped like the published one, as exact weights.

    Accepted: :class:`MaskedHetConv2d` / ``3d``, and a module whose only children are a grouped
    k x k convolution ``gwc`` and a 1 x 1 convolution ``pwc`` (either ``nn.Conv2d`` or both
    ``nn.Conv3d``) with the same channels and stride, whose output is ``gwc(x) + pwc(x)`` (checked
    on a random input). A non-zero block diagonal of ``pwc`` is folded into ``gwc``'s centre taps,
    so an unmasked "approximate HetConv" is read exactly too; both biases are summed.

    Raises:
        ValueError: the module does not have that shape; the message names ``path``.
    """
    where = f"module '{path or '<root>'}' ({type(module).__name__})"
    if isinstance(module, _MaskedHetConvNd):
        gwc, pwc = module.gwc, module.pwc
        dims = module._dims
    else:
        gwc, pwc = getattr(module, "gwc", None), getattr(module, "pwc", None)
        conv_types = tuple(_CONV_TYPES.values())
        if not isinstance(gwc, conv_types) or not isinstance(pwc, conv_types) or type(gwc) is not type(pwc):
            raise ValueError(f"{where} is not a HetConv: expected children 'gwc' and 'pwc' that are both "
                             f"nn.Conv2d or both nn.Conv3d, got {type(gwc).__name__} and {type(pwc).__name__}")
        dims = 2 if isinstance(gwc, nn.Conv2d) else 3
        children = sorted(name for name, _ in module.named_children())
        if children != ["gwc", "pwc"] or any(True for _ in module.parameters(recurse=False)):
            raise ValueError(f"{where} holds more than gwc and pwc (children {children}); "
                             "only a module computing gwc(x) + pwc(x) converts exactly")
    _check_published_pair(gwc, pwc, dims, where)
    pattern = HetConvPattern(gwc.in_channels, gwc.out_channels, gwc.groups, gwc.kernel_size, dims)
    with torch.no_grad():
        dense = _dense_pointwise(pwc)
        if isinstance(module, _MaskedHetConvNd):
            dense = dense.masked_fill(~pattern.mask_1x1(dense.device), 0)
        else:
            _check_sum_forward(module, gwc, pwc, dims, where)
        weight_kxk, dense = pattern.fold(gwc.weight.detach(), dense)
        biases = [b.detach() for b in (gwc.bias, pwc.bias) if b is not None]
        bias = None if not biases else biases[0].clone() if len(biases) == 1 else biases[0] + biases[1]
    return HetConvWeights(pattern, tuple(gwc.stride), weight_kxk, dense, bias)


def _check_published_pair(gwc: nn.Module, pwc: nn.Module, dims: int, where: str) -> None:
    problems = []
    if any(k % 2 == 0 for k in gwc.kernel_size):
        problems.append(f"gwc.kernel_size {gwc.kernel_size} must be odd")
    elif tuple(gwc.padding) != tuple(k // 2 for k in gwc.kernel_size):
        problems.append(f"gwc.padding {gwc.padding} must be kernel_size // 2 = "
                        f"{tuple(k // 2 for k in gwc.kernel_size)}")
    if gwc.in_channels % gwc.groups or gwc.out_channels % gwc.groups:
        problems.append(f"gwc.groups ({gwc.groups}) must divide its channels ({gwc.in_channels}, {gwc.out_channels})")
    if tuple(pwc.kernel_size) != (1,) * dims or tuple(pwc.padding) != (0,) * dims:
        problems.append(f"pwc must be a 1x1 convolution without padding, got kernel_size "
                        f"{pwc.kernel_size} and padding {pwc.padding}")
    if (pwc.in_channels, pwc.out_channels) != (gwc.in_channels, gwc.out_channels):
        problems.append(f"pwc maps {pwc.in_channels}->{pwc.out_channels} channels but gwc maps "
                        f"{gwc.in_channels}->{gwc.out_channels}")
    if tuple(pwc.stride) != tuple(gwc.stride):
        problems.append(f"pwc.stride {pwc.stride} differs from gwc.stride {gwc.stride}")
    for name, conv in (("gwc", gwc), ("pwc", pwc)):
        if any(d != 1 for d in conv.dilation) or conv.padding_mode != "zeros":
            problems.append(f"{name} must have dilation 1 and padding_mode 'zeros'")
        if isinstance(conv.padding, str):
            problems.append(f"{name}.padding must be numeric, got {conv.padding!r}")
    if problems:
        raise ValueError(f"{where} cannot be read as a HetConv: " + "; ".join(problems))


def _dense_pointwise(pwc: nn.Module) -> Tensor:
    """``pwc``'s weight as a full ``(N, M)`` matrix, expanding a grouped 1 x 1 convolution."""
    weight = pwc.weight.detach().reshape(pwc.out_channels, -1)
    if pwc.groups == 1:
        return weight.clone()
    dense = weight.new_zeros(pwc.out_channels, pwc.in_channels)
    n, m = pwc.out_channels // pwc.groups, pwc.in_channels // pwc.groups
    for g in range(pwc.groups):
        dense[g * n:(g + 1) * n, g * m:(g + 1) * m] = weight[g * n:(g + 1) * n]
    return dense


def _check_sum_forward(module: nn.Module, gwc: nn.Module, pwc: nn.Module, dims: int, where: str) -> None:
    """Run the module once on a small random input and require ``gwc(x) + pwc(x)``."""
    weight = gwc.weight
    size = (2 * max(gwc.kernel_size) + 1,) * dims
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn((1, gwc.in_channels) + size, generator=generator).to(weight.device, weight.dtype)
    try:
        got = module(x)
    except Exception as error:  # a forward that cannot even run on this input is not gwc + pwc
        raise ValueError(f"{where} has gwc and pwc but its forward failed on a test input: {error}") from error
    expected = gwc(x) + pwc(x)
    if not isinstance(got, Tensor) or got.shape != expected.shape or not torch.allclose(
        got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max().clamp(min=1))
    ):
        raise ValueError(f"{where} has gwc and pwc but its forward is not gwc(x) + pwc(x); "
                         "it cannot be converted exactly")
