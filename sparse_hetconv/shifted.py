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

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._base import _HetConvBase
from ._checks import check_bool, check_int
from ._memory_format import check_memory_format
from ._probe import no_global_hooks, probe_input, quiet_copy, relative_change
from ._report import ConversionReport
from .backends import check_backend
from .convert import _FORMS, _SPARSE_BY_DIMS, _check_model, _convert, _dense_candidate, _verify, _where
from .masked import HetConvWeights, _has_own_tensors, _MaskedHetConvNd, read_hetconv_weights
from .pattern import HetConvPattern, shifted_to_block_permutation
from .permutation import ChannelPermutation, absorb_permutations
from .sparse import _SparseHetConvNd, dropped_taps

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


def _read_per_filter(module: nn.Module, layout: _PerFilter, where: str) -> tuple[Tensor, Tensor | None]:
    """The dense ``(N, M, *k)`` weight and bias (float64) of a module that computes a stride-1
    convolution, read from its responses to unit impulses and checked on a random input (with its
    real weights: a non-finite one makes the reading fail)."""
    quiet = quiet_copy(module)
    device = next(quiet.parameters()).device
    k, m_in, n_out, dims = layout.kernel_size, layout.in_channels, layout.out_channels, layout.dims
    size = tuple(2 * kk - 1 for kk in k)
    pad = tuple(kk // 2 for kk in k)
    window = (slice(None), slice(None)) + tuple(slice(p, p + kk) for p, kk in zip(pad, k))
    spatial = tuple(range(2, 2 + dims))
    weight = torch.zeros((n_out, m_in) + k, dtype=torch.float64, device=device)
    try:
        with torch.no_grad(), no_global_hooks():
            zero = quiet(torch.zeros((1, m_in) + size, dtype=torch.float64, device=device))
            if not isinstance(zero, Tensor) or tuple(zero.shape) != (1, n_out) + size:
                raise ValueError(f"returns {tuple(zero.shape) if isinstance(zero, Tensor) else type(zero).__name__}")
            bias = zero[(0, slice(None)) + tuple(kk - 1 for kk in k)]
            for first in range(0, m_in, 64):
                count = min(64, m_in - first)
                impulses = torch.zeros((count, m_in) + size, dtype=torch.float64, device=device)
                impulses[(torch.arange(count), torch.arange(first, first + count)) + tuple(kk - 1 for kk in k)] = 1
                response = quiet(impulses)[window].flip(spatial) - bias.reshape((1, n_out) + (1,) * dims)
                weight[:, first:first + count] = response.transpose(0, 1)
            x = probe_input(m_in, k, device)
            conv = torch.nn.functional.conv2d if dims == 2 else torch.nn.functional.conv3d
            change = relative_change(conv(x, weight, bias, padding=pad), quiet(x))
    except Exception as failure:
        raise ValueError(f"{where} is made of per-filter convolutions but could not be read as one stride-1 "
                         f"convolution over {m_in} channels ({type(failure).__name__}: {failure})") from failure
    if not change <= 1e-9:
        raise ValueError(f"{where} is made of per-filter convolutions, but its forward is not a convolution over "
                         f"{m_in} channels (relative difference {change:.3g} on a test input)")
    return weight, (bias if layout.bias else None)


def _pattern_of(weight: Tensor, part: int) -> str | None:
    """``"shifted"`` or ``"block"``: the pattern whose k x k kernels hold every non-zero
    non-centre tap of a dense ``(N, M, *k)`` weight (shifted first); None if neither does."""
    n_out, n_in = weight.shape[:2]
    taps = weight.abs().flatten(2).clone()
    taps[..., taps.shape[-1] // 2] = 0
    used = taps.amax(-1) > 0
    j = torch.arange(n_out, device=weight.device)[:, None]
    c = torch.arange(n_in, device=weight.device)[None, :]
    if not (used & ((c - j) % part != 0)).any():
        return "shifted"
    if n_out % part == 0 and not (used & (c // (n_in // part) != j // (n_out // part))).any():
        return "block"
    return None


def _to_block(weight: Tensor, bias: Tensor | None, part: int, layout: str, stride, dims: int, dtype, where: str):
    """Block-pattern weights of a dense shifted (or block) layer, the permutations around them and
    the largest dropped weight."""
    n_out, n_in = weight.shape[:2]
    for name, channels in (("in_channels", n_in), ("out_channels", n_out)):
        if channels % part:
            raise ValueError(f"{where}: {name} ({channels}) must be divisible by part ({part}) to reorder it into "
                             "the block pattern")
    identity = (torch.arange(n_in), torch.arange(n_out))
    p_in, p_out = identity if layout == "block" else (shifted_to_block_permutation(n_in, part),
                                                     shifted_to_block_permutation(n_out, part))
    block = weight[p_out.to(weight.device)][:, p_in.to(weight.device)]
    pattern = HetConvPattern(n_in, n_out, part, tuple(weight.shape[2:]), dims)
    p, n, m = part, pattern.block_out, pattern.block_in
    index = torch.arange(p, device=weight.device)
    kxk = block.view((p, n, p, m) + pattern.kernel_size)[index, :, index].reshape((n_out, m) + pattern.kernel_size)
    centre = (slice(None), slice(None)) + pattern.centre
    dense = block[centre].masked_fill(~pattern.mask_1x1(weight.device), 0)
    new_bias = None if bias is None else bias[p_out.to(bias.device)].to(dtype)
    read = HetConvWeights(pattern, tuple(stride), kxk.to(dtype), dense.to(dtype), new_bias)
    return read, p_in, p_out, dropped_taps(block, pattern)


def _wrap(before: Tensor, layer: nn.Module, after: Tensor) -> nn.Module:
    """``layer`` between two channel permutations (identities left out)."""
    parts = OrderedDict()
    if not torch.equal(before, torch.arange(before.numel())):
        parts["permute_in"] = ChannelPermutation(before).to(_device(layer))
    parts["layer"] = layer
    if not torch.equal(after, torch.arange(after.numel())):
        parts["permute_out"] = ChannelPermutation(after).to(_device(layer))
    return layer if len(parts) == 1 else nn.Sequential(parts)


def _device(module: nn.Module):
    return next(module.parameters()).device


def _layer(read: HetConvWeights, form: str, backend: str, training: bool) -> nn.Module:
    layer = _SPARSE_BY_DIMS[read.pattern.dims]._from_weights(read, backend)
    return (layer if form == "sparse" else layer.to_masked()).train(training)


def _finisher(wrappers: set[int], protected: list[nn.Module]):
    """Absorb the permutations, then drop the identities they leave in the wrappers."""

    def finish(model: nn.Module, report: ConversionReport) -> nn.Module:
        if not wrappers:
            return model
        absorb_permutations(model, protected)
        paths: dict[int, list[str]] = {}
        for path, module in model.named_modules(remove_duplicate=False):
            if id(module) in wrappers:
                paths.setdefault(id(module), []).append(path)
        for key, where in paths.items():
            wrapper = model.get_submodule(where[0])
            kept = OrderedDict((name, child) for name, child in wrapper.named_children()
                               if not (isinstance(child, ChannelPermutation) and child.is_identity()))
            new = kept["layer"] if len(kept) == 1 else nn.Sequential(kept)
            for path in where:
                if not path:
                    model = new
                    break
                parent, _, name = path.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, name, new)
        report.permutations = [path for path, module in model.named_modules(remove_duplicate=False)
                               if isinstance(module, ChannelPermutation) and not module.is_identity()]
        return model

    return finish


def from_shifted(model: nn.Module, part: int | None = None, *, approximate: bool = False, skip_first: bool = True,
                 include=None, form: str = "sparse", backend: str = "auto", inplace: bool = False,
                 memory_format=torch.channels_last, return_report: bool = False):
    """Convert HetConv layers in the paper's *shifted* pattern into block-pattern HetConv layers.

    Converted:

    * **Per-filter modules** (sxpro's ``HetConv2d`` and ``HetConv2d_v2``, and the like): a module
      whose descendants are only containers and convolutions with one output channel, one
      container per filter, the convolutions of each reading ``M`` input channels together
      (``M / P`` of them through k x k kernels), stride 1. The module's forward is read as one
      dense convolution from its responses to unit impulses (run on a float64 copy without hooks)
      and checked on a random input; its part comes from its structure, and its k x k kernels
      must lie in the shifted pattern (or the block pattern, which needs no permutation). A bias
      on every small convolution adds up to one bias per filter. Always exact.
    * With ``part``: **dense ``nn.Conv2d`` / ``nn.Conv3d``** layers trained under a shifted mask
      (:func:`shifted_mask`; the naive implementation), chosen as by
      :func:`~sparse_hetconv.hetconvify` (``skip_first``, ``include``, channels divisible by
      ``part``). Exact when every tap outside the pattern is zero; a convolution with other
      non-zero taps is skipped (``report.skipped`` says how large they are) unless
      ``approximate=True``, which drops them and reports the largest dropped weight and the
      relative output change (``report.dropped``).

    Each layer becomes ``block(x[:, p_in])[:, argsort(p_out)]`` (docs/design.md §2). The
    permutations are then absorbed (docs/design.md §8): moved through BatchNorm, elementwise
    activations, pooling and dropout, folded into a neighbouring standard convolution or a
    ``Linear`` after a flatten, or cancelled against the next shifted layer's (two consecutive
    layers with the same part need none). The data flow comes from ``torch.fx`` where the model
    traces, from ``nn.Sequential`` order otherwise. Only where a permutation cannot be absorbed
    safely (the model's input or output, a residual branch, another part next door, a module used
    twice or with hooks) does a :class:`ChannelPermutation` remain, as ``<path>.permute_in`` /
    ``<path>.permute_out`` around ``<path>.layer``; ``report.permutations`` lists them. Standard
    convolutions and ``Linear`` layers next to converted ones get permuted weights (the function
    is unchanged). The converted layer's output channels are in block order, so hooks on a
    replaced module are refused rather than carried over.

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
            whose kernels are in neither pattern, channels not divisible by its part, a hook on a
            replaced module (the message names the path); ``model`` is left untouched.

    Example:
        >>> conv = nn.Conv2d(8, 8, 3, padding=1)
        >>> with torch.no_grad():
        ...     conv.weight.mul_(shifted_mask(8, 8, part=4))
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), conv, nn.ReLU(), nn.Conv2d(8, 2, 1))
        >>> new, report = from_shifted(net, part=4, return_report=True)
        >>> type(new[2]).__name__, report.exact, report.permutations
        ('SparseHetConv2d', True, [])
    """
    _check_model(model)
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
        if layout is not None:
            weight, bias = _read_per_filter(module, layout, where)
            kind = _pattern_of(weight, layout.part)
            if kind is None:
                raise ValueError(f"{where} has per-filter k x k kernels (part {layout.part}) in neither the shifted "
                                 "nor the block pattern; it cannot be converted exactly")
            dtype = next(module.parameters()).dtype
            read, p_in, p_out, dropped = _to_block(weight, bias, layout.part, kind, (1,) * layout.dims, layout.dims,
                                                   dtype, where)
        elif part is not None and type(module) in _CONV_TYPES.values():
            dims = _dense_candidate(path, module, part, skip_first, include, seen_first, report)
            if dims is None:
                return None
            bias = None if module.bias is None else module.bias.detach().double()
            read, p_in, p_out, dropped = _to_block(module.weight.detach().double(), bias, part, "shifted",
                                                   module.stride, dims, module.weight.dtype, where)
            if dropped and not approximate:
                report.skipped[path] = (f"weights outside the shifted pattern (largest |w| {dropped:.3g}); "
                                        "approximate=True drops them")
                return None
        else:
            return None
        layer = _layer(read, form, backend, module.training)
        new = _wrap(p_in, layer, torch.argsort(p_out))
        change = _verify(path, module, new, exact=not (layout is None and dropped), channels=read.pattern.in_channels,
                         kernel_size=read.pattern.kernel_size)
        if layout is None and dropped:
            report.dropped[path] = (dropped, change)
        if new is not layer:
            wrappers.add(id(new))
        return new

    return _convert(model, build, inplace, "from_shifted", memory_format, return_report, report=report,
                    carry_hooks=False, finish=_finisher(wrappers, []))


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
                                  module.dense_1x1().detach(), bias)
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
        conv = _CONV_TYPES[pattern.dims](pattern.in_channels, pattern.out_channels, pattern.kernel_size, read.stride,
                                         pattern.padding, bias=read.bias is not None, device=kxk.device,
                                         dtype=kxk.dtype)
        with torch.no_grad():
            conv.weight.copy_(shifted)
            if read.bias is not None:
                conv.bias[p_out] = read.bias
        conv.train(module.training)
        new = _wrap(torch.argsort(p_in).cpu(), conv, p_out.cpu())
        _verify(path, module, new, channels=pattern.in_channels, kernel_size=pattern.kernel_size)
        if new is not conv:
            wrappers.add(id(new))
        protected.append(conv)
        return new

    return _convert(model, build, inplace, "to_shifted", memory_format, return_report, report=report,
                    carry_hooks=False, finish=_finisher(wrappers, protected))
