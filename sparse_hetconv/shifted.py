"""The paper's shifted HetConv pattern: converting layers that use it to block-pattern ones and back.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. The paper draws filter ``j``'s
k x k kernels on the input channels ``c`` with ``(c - j) % P == 0``; this library's layers put
them on blocks. The two are the same layer up to a permutation of the input channels and one of
the filters (docs/design.md §2):

    shifted(x) = block(x[:, p_in])[:, argsort(p_out)]

with ``p_in = shifted_to_block_permutation(M, P)`` and ``p_out = shifted_to_block_permutation(N, P)``.
:func:`from_shifted` replaces every shifted-pattern layer by the block-pattern one between those
two permutations, then moves the permutations into the neighbouring layers
(:func:`sparse_hetconv.permutation.absorb_permutations`, docs/design.md §8), so that in a chain
like VGG nothing is permuted at run time; :func:`to_shifted` goes the other way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._base import _HetConvBase
from ._checks import check_bool, check_int, check_model
from ._memory_format import check_memory_format
from ._probe import probe_extent
from ._report import ConversionReport
from .backends import check_backend
from .convert import _FORMS, _SPARSE_BY_DIMS, _convert, _dense_candidate, _verify, _where
from .layouts import HetConvWeights, _has_own_tensors, read_hetconv_weights
from .masked import _MaskedHetConvNd
from .pattern import HetConvPattern, shifted_to_block_permutation
from .permutation import ChannelPermutation, between_permutations, permutation_finisher
from .probing import Probe, block_weights, read_probed
from .sparse import _SparseHetConvNd, conv_geometry

__all__ = ["ChannelPermutation", "from_shifted", "shifted_mask", "to_shifted"]

_CONV_TYPES = {2: nn.Conv2d, 3: nn.Conv3d}
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def shifted_mask(in_channels: int, out_channels: int, part: int, kernel_size=3, dims: int = 2) -> Tensor:
    """The taps a HetConv in the paper's shifted pattern has, as a dense weight's mask.

    Filter ``j`` has full k x k kernels on the channels ``c`` with ``(c - j) % part == 0`` and
    only the centre tap elsewhere. Multiply a dense ``nn.Conv2d``'s weight by it (in ``forward``,
    or after each optimizer step) to train the naive shifted HetConv that :func:`from_shifted`
    converts exactly.

    Args:
        in_channels (int), out_channels (int), part (int): ``M``, ``N``, ``P`` (both divisible by it).
        kernel_size (int or tuple): odd k.
        dims (int): 2 or 3.

    Returns:
        Tensor[out_channels, in_channels, *kernel_size] (bool).

    Example:
        >>> shifted_mask(4, 2, part=2, kernel_size=3)[:, :, 0, 0].int()
        tensor([[1, 0, 1, 0],
                [0, 1, 0, 1]], dtype=torch.int32)
    """
    pattern = HetConvPattern(in_channels, out_channels, part, kernel_size, dims)
    j = torch.arange(out_channels)[:, None]
    c = torch.arange(in_channels)[None, :]
    kxk = (c - j) % part == 0
    mask = kxk.reshape(kxk.shape + (1,) * dims).expand(kxk.shape + pattern.kernel_size).clone()
    mask[(slice(None), slice(None)) + pattern.centre] = True
    return mask


@dataclass(frozen=True)
class _PerFilter:
    """A module of per-filter convolutions (sxpro's ``HetConv2d`` / ``HetConv2d_v2`` layout)."""

    in_channels: int
    out_channels: int
    part: int
    kernel_size: tuple[int, ...]
    dims: int
    bias: bool


def _per_filter_layout(module: nn.Module, where: str) -> _PerFilter | None:
    """The layout of a module made of one container of convolutions per filter, or None.

    Every descendant is a convolution with one output channel or a plain container; the
    convolutions of each container (one per filter, at least two filters) read ``M`` input
    channels together, those with a k x k kernel ``M / P`` of them (``P > 1``).
    """
    if isinstance(module, (nn.modules.conv._ConvNd, _CONTAINERS, _HetConvBase)) or _has_own_tensors(module):
        return None
    convs = []
    for sub in module.modules():
        if sub is module:
            continue
        if isinstance(sub, _CONTAINERS) and not _has_own_tensors(sub):
            continue
        if type(sub) not in _CONV_TYPES.values() or sub.out_channels != 1:
            return None
        convs.append(sub)
    if not convs or len({type(c) for c in convs}) != 1:
        return None
    dims = 2 if isinstance(convs[0], nn.Conv2d) else 3
    ids = {id(c) for c in convs}
    filters = [[c for c in sub.children() if id(c) in ids] for sub in module.modules()]
    filters = [f for f in filters if f]
    if len(filters) < 2:
        return None  # one container of 1-channel convolutions (a head, say) is not a layer of filters
    widths = {sum(c.in_channels for c in f) for f in filters}
    kxk = {sum(c.in_channels for c in f if any(k != 1 for k in c.kernel_size)) for f in filters}
    if len(widths) != 1 or len(kxk) != 1 or 0 in kxk:
        return None
    (in_channels,), (block,) = widths, kxk
    if in_channels % block or in_channels == block:
        return None
    for conv in convs:
        if conv.groups != 1 or any(s != 1 for s in conv.stride) or any(d != 1 for d in conv.dilation) \
                or conv.padding_mode != "zeros" or isinstance(conv.padding, str) \
                or any(k % 2 == 0 for k in conv.kernel_size) \
                or tuple(conv.padding) != tuple(k // 2 for k in conv.kernel_size):
            raise ValueError(f"{where} is made of per-filter convolutions, but they are not all stride-1, "
                             "ungrouped, odd-kernel convolutions with padding k // 2 and zero padding mode; "
                             "only such a layer is read as a HetConv")
    kernel = tuple(max(c.kernel_size[d] for c in convs) for d in range(dims))
    return _PerFilter(in_channels, len(filters), in_channels // block, kernel, dims,
                      any(c.bias is not None for c in convs))


def _layer(read: HetConvWeights, form: str, backend: str, training: bool) -> nn.Module:
    layer = _SPARSE_BY_DIMS[read.pattern.dims]._from_weights(read, backend)
    return (layer if form == "sparse" else layer.to_masked()).train(training)


def from_shifted(model: nn.Module, part: int | None = None, *, approximate: bool = False, skip_first: bool = True,
                 include=None, form: str = "sparse", backend: str = "auto", inplace: bool = False,
                 memory_format=torch.channels_last, return_report: bool = False):
    """Convert HetConv layers in the paper's *shifted* pattern into block-pattern HetConv layers.

    Converted:

    * **Per-filter modules** (sxpro's ``HetConv2d`` and ``HetConv2d_v2``, and the like): a module
      whose descendants are only containers and convolutions with one output channel, one
      container per filter, the convolutions of each reading ``M`` input channels together
      (``M / P`` of them through k x k kernels), stride 1. Its part comes from its structure; its
      forward is read as one dense convolution by probing (:mod:`sparse_hetconv.probing`: unit
      impulses on a copy without hooks, checked on a random input), and its k x k kernels must
      form the HetConv pattern of that part up to a channel permutation (the shifted pattern, the
      block pattern, or any other). A bias on every small convolution adds up to one bias per
      filter. Always exact.
    * With ``part``: **dense ``nn.Conv2d`` / ``nn.Conv3d``** layers trained under a shifted mask
      (:func:`shifted_mask`; the naive implementation), chosen as by
      :func:`~sparse_hetconv.hetconvify` (``skip_first``, ``include``, channels divisible by
      ``part``). Exact when every tap outside the pattern is zero; a convolution with other
      non-zero taps is skipped (``report.skipped`` says how large they are) unless
      ``approximate=True``, which drops them and reports the largest dropped weight and the
      relative output change (``report.dropped``).

    Each layer becomes ``block(x[:, p_in])[:, argsort(p_out)]`` (docs/design.md §2), and the
    permutations are absorbed by the neighbours (docs/design.md §8: through BatchNorm, activations,
    pooling, into standard convolutions and ``Linear`` layers, or cancelled by the next shifted
    layer). Where that is not safe, a :class:`ChannelPermutation` remains as
    ``<path>.permute_in`` / ``<path>.permute_out`` around ``<path>.layer`` (``report.permutations``).
    Hooks on a replaced module are refused (its output channels are in block order).

    Args:
        model (nn.Module): the model (or a single layer).
        part (int, optional): ``P`` for dense convolutions; None converts per-filter modules only.
        approximate (bool): also convert dense convolutions with weights outside the pattern.
        skip_first (bool): leave the first dense convolution alone (``part`` only). Default True.
        include (callable, optional): ``include(path, conv) -> bool`` for dense convolutions.
        form (str): ``"sparse"`` (:class:`SparseHetConv2d`) or ``"masked"``.
        backend (str): ``backend`` of new sparse layers.
        inplace (bool): change ``model`` itself instead of a deep copy.
        memory_format (torch.memory_format or None): as for :func:`~sparse_hetconv.to_sparse`.
        return_report (bool): also return the :class:`~sparse_hetconv.ConversionReport`.

    Returns:
        nn.Module, or ``(nn.Module, ConversionReport)`` with ``return_report=True``.

    Raises:
        TypeError / ValueError: bad arguments; a per-filter module that is not a convolution or
            whose kernels form no HetConv pattern, channels not divisible by its part, a hook on a
            replaced module (the message names the path); ``model`` is left untouched.

    Example:
        >>> conv = nn.Conv2d(8, 8, 3, padding=1)
        >>> with torch.no_grad():
        ...     _ = conv.weight.mul_(shifted_mask(8, 8, part=4))
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), conv, nn.ReLU(), nn.Conv2d(8, 2, 1))
        >>> new, report = from_shifted(net, part=4, return_report=True)
        >>> type(new[2]).__name__, report.exact, report.permutations
        ('SparseHetConv2d', True, [])
    """
    check_model(model)
    if part is not None:
        check_int("part", part)
    for name, value in (("approximate", approximate), ("skip_first", skip_first), ("inplace", inplace),
                        ("return_report", return_report)):
        check_bool(name, value)
    if include is not None and not callable(include):
        raise TypeError(f"include must be callable or None, got {type(include).__name__}")
    if form not in _FORMS:
        raise ValueError(f"form ({form!r}) must be one of {_FORMS}")
    check_backend(backend)
    check_memory_format(memory_format)
    report = ConversionReport("from_shifted", part=part, form=form)
    wrappers: set[int] = set()
    seen_first: list[str] = []

    def build(path, module):
        where = _where(path, module)
        layout = _per_filter_layout(module, where)
        if layout is not None:  # its part from the structure, its weights and permutations by probing
            spec = Probe(type(module), layout.in_channels, layout.kernel_size, 1, layout.part)
            (read, p_in, p_out), dropped = read_probed(module, where, spec), 0.0
        elif part is not None and type(module) in _CONV_TYPES.values():
            dims = _dense_candidate(path, module, part, skip_first, include, seen_first, report)
            if dims is None:
                return None
            bias = None if module.bias is None else module.bias.detach().double()
            p_in, p_out = (shifted_to_block_permutation(c, part) for c in (module.in_channels, module.out_channels))
            read, dropped = block_weights(module.weight.detach().double(), bias, part, p_in, p_out, module.stride,
                                          module.weight.dtype)
            read = read._replace(**conv_geometry(module))  # dilation, padding and its mode carry over
            if dropped and not approximate:
                report.skipped[path] = (f"weights outside the shifted pattern (largest |w| {dropped:.3g}); "
                                        "approximate=True drops them")
                return None
        else:
            return None
        layer = _layer(read, form, backend, module.training)
        new = between_permutations(p_in, layer, torch.argsort(p_out))
        change = _verify(path, module, new, exact=not dropped, channels=read.pattern.in_channels,
                         kernel_size=probe_extent(layer))
        if dropped:
            report.dropped[path] = (dropped, change)
        if new is not layer:
            wrappers.add(id(new))
        return new

    return _convert(model, build, inplace, "from_shifted", memory_format, return_report, report=report,
                    carry_hooks=False, finish=permutation_finisher(wrappers, []))


def to_shifted(model: nn.Module, *, inplace: bool = False, memory_format=torch.channels_last,
               return_report: bool = False):
    """Convert block-pattern HetConv layers into dense convolutions in the paper's shifted pattern.

    The inverse of :func:`from_shifted`, for code that needs the paper's layout: every
    :class:`SparseHetConv2d` / ``3d`` and :class:`MaskedHetConv2d` / ``3d`` becomes an
    ``nn.Conv2d`` / ``nn.Conv3d`` (``padding = k // 2``, same stride and bias) whose weight is zero
    outside :func:`shifted_mask`, between the two channel permutations of docs/design.md §2,
    which are then absorbed as by :func:`from_shifted` (the new convolutions themselves never
    absorb one, so their pattern stays shifted). ``from_shifted(to_shifted(m), part=P)`` gives
    ``m`` back, weights included, when every layer has part ``P``. Exact; shared layers, hooks and
    the report as for :func:`from_shifted`.

    Args:
        model (nn.Module): the model (or a single layer).
        inplace (bool): change ``model`` itself instead of a deep copy.
        memory_format (torch.memory_format or None): as for :func:`~sparse_hetconv.to_sparse`.
        return_report (bool): also return the :class:`~sparse_hetconv.ConversionReport`.

    Returns:
        nn.Module, or ``(nn.Module, ConversionReport)`` with ``return_report=True``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a hook on a replaced layer, a shared tensor; ``model`` is left untouched.
    """
    report = ConversionReport("to_shifted", form="shifted")
    wrappers: set[int] = set()
    protected: list[nn.Module] = []

    def build(path, module):
        if isinstance(module, _SparseHetConvNd):
            bias = None if module.bias is None else module.bias.detach()
            read = HetConvWeights(module.pattern, module.stride, module.weight_kxk.detach(),
                                  module.dense_1x1().detach(), bias, module.padding, module.dilation,
                                  module.padding_mode)
        elif isinstance(module, _MaskedHetConvNd):
            read = read_hetconv_weights(module, path)
        else:
            return None
        pattern, kxk = read.pattern, read.weight_kxk
        p, n, m = pattern.part, pattern.block_out, pattern.block_in
        block = torch.zeros((pattern.out_channels, pattern.in_channels) + pattern.kernel_size, dtype=torch.float64,
                            device=kxk.device)
        index = torch.arange(p, device=kxk.device)
        block.view((p, n, p, m) + pattern.kernel_size)[index, :, index] = \
            kxk.double().view((p, n, m) + pattern.kernel_size)
        block[(slice(None), slice(None)) + pattern.centre] += read.dense_1x1.double()
        p_in = shifted_to_block_permutation(pattern.in_channels, p).to(kxk.device)
        p_out = shifted_to_block_permutation(pattern.out_channels, p).to(kxk.device)
        shifted = torch.empty_like(block)
        shifted[p_out[:, None], p_in[None, :]] = block
        geometry = read.geometry()
        conv = _CONV_TYPES[pattern.dims](pattern.in_channels, pattern.out_channels, pattern.kernel_size, read.stride,
                                         pattern.padding if geometry["padding"] is None else geometry["padding"],
                                         geometry["dilation"], bias=read.bias is not None,
                                         padding_mode=geometry["padding_mode"], device=kxk.device, dtype=kxk.dtype)
        with torch.no_grad():
            conv.weight.copy_(shifted)
            if read.bias is not None:
                conv.bias[p_out] = read.bias
        conv.train(module.training)
        new = between_permutations(torch.argsort(p_in).cpu(), conv, p_out.cpu())
        _verify(path, module, new, channels=pattern.in_channels, kernel_size=probe_extent(conv))
        if new is not conv:
            wrappers.add(id(new))
        protected.append(conv)
        return new

    return _convert(model, build, inplace, "to_shifted", memory_format, return_report, report=report,
                    carry_hooks=False, finish=permutation_finisher(wrappers, protected))
