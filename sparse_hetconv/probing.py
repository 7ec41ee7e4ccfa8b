"""Conversion by probing: the convolution a module computes, read from its responses, and its HetConv pattern.

The converters read the known layouts by their structure (:mod:`sparse_hetconv.layouts`,
:mod:`sparse_hetconv.shifted`). Any other module that computes a HetConv up to a permutation of its
channels is linear and translation-equivariant: it *is* one convolution, read here from one call on
a zero input (bias, stride) and one batched call on unit impulses (weights), checked on a random
input (random, not linear, stateful or another convolution: each its own error), and split into the
largest ``P`` blocks that hold its k x k taps, with the permutations that sort filters and channels
into them (docs/conversion.md, "Conversion by probing"; docs/design.md §8). It runs on a copy
without hooks, in float64 (or float32 for a float32 or half module on the CPU, with float64 as the
fallback); the converters check the result in float64.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from itertools import chain, product

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_int, check_tuple, import_object
from ._probe import no_global_hooks, probe_input, quiet_copy, relative_change
from .layouts import HetConvWeights
from .pattern import HetConvPattern
from .sparse import dropped_taps

__all__ = ["Probe", "block_weights", "find_groups", "read_convolution"]

_CONV = {2: F.conv2d, 3: F.conv3d}
_ZERO = 24  # size of the zero input that shows bias and stride: strides 1 to 5 give distinct output sizes
_BUDGET = 1 << 23  # input elements per impulse call (64 MiB in float64)
_IMPULSE = 2.0 ** 20  # an exact power of two, large enough that a bias does not swamp the taps in float32
# relative difference between a module and the convolution read from it, by the dtype it was read in
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}


@dataclass(frozen=True)
class Probe:
    """A module to convert by probing (``to_sparse(model, probe=...)``), and what is known of it.

    Args:
        target (type or str): an ``nn.Module`` class (its instances, subclasses included),
            ``"package.module:Class"`` (imported here), or the path of a module in the model
            (``"features.3"``; ``""`` is the model itself).
        in_channels (int, optional): ``M``. Default: the module's ``in_channels`` attribute, else
            the smallest of the channel sizes of its tensors and children (and sums of two) that its
            forward accepts.
        kernel_size (int or tuple, optional): the odd k. Default: the largest kernel among its 4-D
            (3-D layers: 5-D) parameters and buffers.
        stride (int or tuple, optional): checked against the module's output size; default: read
            from it.
        part (int, optional): ``P``. Default: the largest ``P >= 2`` whose blocks hold every k x k tap.

    Raises:
        TypeError: a target of another type, a non-int setting.
        ValueError: a setting below 1; a ``"package.module:Class"`` that cannot be imported.

    Example:
        >>> import torch.nn.functional as F
        >>> class MyHetConv(nn.Module):  # a HetConv as one masked dense convolution
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.randn(8, 8, 3, 3) * shifted_mask(8, 8, part=4))
        ...     def forward(self, x):
        ...         return F.conv2d(x, self.weight, padding=1)
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), MyHetConv(), nn.ReLU(), MyHetConv())
        >>> new = to_sparse(model, probe=[Probe(MyHetConv, stride=1), "3"])  # a class and a path
        >>> [type(m).__name__ for m in new]  # the last one comes with its channel permutation
        ['Conv2d', 'SparseHetConv2d', 'ReLU', 'Sequential']
    """

    target: object
    in_channels: int | None = None
    kernel_size: object = None
    stride: object = None
    part: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target, str) and ":" in self.target:
            object.__setattr__(self, "target", import_object(self.target, "probe"))
        if not isinstance(self.target, str) and not (isinstance(self.target, type) and
                                                     issubclass(self.target, nn.Module)):
            raise TypeError(f"probe target must be an nn.Module class, 'package.module:Class' or a module path "
                            f"such as 'features.3', got {type(self.target).__name__} ({self.target!r})")
        for name in ("in_channels", "part"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name))
        for name in ("kernel_size", "stride"):
            value = getattr(self, name)
            if value is not None:
                check_tuple(name, value, max(1, len(value)) if isinstance(value, (tuple, list)) else 1)


class ProbeTargets:
    """``to_sparse``'s ``probe`` argument: which modules to probe, matched by path or class.

    A path names the module, so every path where that module sits matches; a path is preferred to
    a class. Raises ``TypeError`` / ``ValueError`` (a path the model does not have) at once.
    """

    def __init__(self, probe, model: nn.Module) -> None:
        items = [probe] if isinstance(probe, (str, type, Probe)) else probe
        try:
            items = list(items)
        except TypeError:
            raise TypeError(f"probe must be a module class, a str, a Probe or a list of them, got "
                            f"{type(probe).__name__}") from None
        self.specs = [item if isinstance(item, Probe) else Probe(item) for item in items]
        modules = dict(model.named_modules(remove_duplicate=False))
        self.paths: dict[str, Probe] = {}
        for spec in self.specs:
            if isinstance(spec.target, str):
                if spec.target not in modules:
                    raise ValueError(f"probe ({spec.target!r}): the model has no module at that path")
                self.paths.update({path: spec for path, module in modules.items()
                                   if module is modules[spec.target]})
        self.used: set[int] = set()

    def match(self, path: str, module: nn.Module) -> Probe | None:
        spec = self.paths.get(path) or next((s for s in self.specs if isinstance(s.target, type) and
                                             isinstance(module, s.target)), None)
        if spec is not None:
            self.used.add(id(spec))
        return spec

    def warn_unused(self, converter: str) -> None:
        unused = [s.target if isinstance(s.target, str) else s.target.__name__ for s in self.specs
                  if id(s) not in self.used]
        if unused:
            warnings.warn(f"{converter}: probe {', '.join(map(repr, unused))} matched no module (or only modules "
                          "inside one converted by its layout)", stacklevel=3)


# -- reading the convolution ---------------------------------------------------------------------------
def read_convolution(module: nn.Module, where: str, in_channels: int | None = None, kernel_size=None, stride=None,
                     dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor | None, tuple[int, ...]]:
    """The convolution ``module`` computes, read from its responses (module notes, steps 1-3).

    Args:
        module (nn.Module): the module, run as a copy without hooks in ``dtype``, in its own
            train/eval modes (so that a BatchNorm in training mode shows itself).
        where (str): the module's name for messages, e.g. ``"module 'features.3' (BranchHetConv)"``.
        in_channels, kernel_size, stride: as for :class:`Probe`.
        dtype (torch.dtype): float64, or float32 (faster, exact to float32's rounding).

    Returns:
        (Tensor[N, M, *k], Tensor[N] or None, tuple): weight and bias (float64, on the module's
        device; a bias when the module has a parameter called ``bias`` or a non-zero one) and stride,
        for padding ``k // 2``.

    Raises:
        ValueError: naming ``where`` and what was found: no input it accepts, a kernel or output size
            that no HetConv has, a state that changes, randomness, non-linearity, inf or NaN.
    """
    quiet = quiet_copy(module, dtype)
    for source, clone in zip(module.modules(), quiet.modules()):
        clone.training = source.training
    dims, kernel = _kernel(module, kernel_size, where)
    device = next(chain(quiet.parameters(), quiet.buffers()), torch.empty(0)).device
    state = {name: buffer.clone() for name, buffer in quiet.named_buffers()}

    def run(x: Tensor) -> Tensor:
        with torch.no_grad(), no_global_hooks():
            y = quiet(x)
        if not isinstance(y, Tensor) or y.dim() != dims + 2 or len(y) != len(x):
            got = f"shape {tuple(y.shape)}" if isinstance(y, Tensor) else f"a {type(y).__name__}"
            raise ValueError(f"{where} returns {got} for an input of shape {tuple(x.shape)}, expected one tensor "
                             f"(batch, channels, {'depth, ' * (dims == 3)}height, width)")
        return y

    scalar = torch.zeros((), dtype=dtype, device=device)
    channels = _in_channels(module, run, in_channels, kernel, scalar, where)
    blank = scalar.new_zeros((1, channels) + (_ZERO,) * dims)
    zero = run(blank)
    changed = [name for name, buffer in quiet.named_buffers() if not torch.equal(buffer, state[name])]
    if changed:
        owner = type(quiet.get_submodule(changed[0].rpartition(".")[0])).__name__
        raise ValueError(f"{where} changes its buffer '{changed[0]}' ({owner}) when called: a module with state, "
                         "such as a BatchNorm in training mode, is not a convolution; call .eval() on it first")
    stride = _stride(tuple(zero.shape[2:]), stride, kernel, where)
    bias = zero.flatten(2)[0, :, 0].double()
    spread = float((zero.double() - bias.view((-1,) + (1,) * dims)).abs().max())
    if spread > _TOLERANCE[dtype] * float(bias.abs().max()):
        _refuse(where, run, blank, zero, "its output for a zero input differs from position to position: it is "
                "not translation-invariant")
    weight = _impulse_responses(run, scalar, channels, bias, kernel, stride, where)
    if not (bool(torch.isfinite(weight).all()) and bool(torch.isfinite(bias).all())):
        raise ValueError(f"{where}: its responses hold inf or NaN (non-finite weights?); fix or drop them first")
    _check(run, scalar, weight, bias, stride, where)
    named = any(name.rpartition(".")[2] == "bias" for name, _ in module.named_parameters())
    return weight, (bias if named or bool(bias.any()) else None), stride


def _kernel(module: nn.Module, given, where: str) -> tuple[int, tuple[int, ...]]:
    shapes = [t.shape for t in chain(module.parameters(), module.buffers()) if t.dim() in (4, 5)]
    dims = max(len(s) for s in shapes) - 2 if shapes else 2
    if given is not None:
        dims = len(given) if isinstance(given, (tuple, list)) else dims
        kernel = check_tuple("kernel_size", given, dims)
    elif shapes:
        kernel = tuple(max(s[2 + d] for s in shapes if len(s) == dims + 2) for d in range(dims))
    else:
        raise ValueError(f"{where} has no 4-D or 5-D parameter or buffer (a convolution weight) to read its kernel "
                         "size from; pass kernel_size (Probe(..., kernel_size=k))")
    if any(k % 2 == 0 for k in kernel) or all(k == 1 for k in kernel):
        raise ValueError(f"{where}: kernel size {kernel} is {'even' if any(k % 2 == 0 for k in kernel) else '1x1'}; "
                         "a HetConv has an odd k x k kernel with k > 1 (pass kernel_size if it is not the largest "
                         "of its tensors)")
    return dims, kernel


def _in_channels(module: nn.Module, run, given: int | None, kernel: tuple[int, ...], scalar: Tensor,
                 where: str) -> int:
    """``given``, else the module's ``in_channels`` or the smallest plausible count its forward accepts."""
    if given is not None:
        candidates = [given]
    else:
        own = getattr(module, "in_channels", None)
        sizes = {getattr(sub, "in_channels", None) for sub in module.modules()}
        sizes = {s for s in sizes if isinstance(s, int) and not isinstance(s, bool) and s > 0}
        sizes |= {t.shape[1] for t in chain(module.parameters(), module.buffers()) if t.dim() >= 2}
        sizes |= {a + b for a in sizes for b in sizes}
        candidates = ([own] if own in sizes else []) + sorted(sizes - {own})
    failure: Exception | None = None
    for channels in candidates:
        try:
            run(scalar.new_zeros((1, channels) + kernel))
            return channels
        except Exception as error:  # the user's forward on a wrong channel count fails in any way
            failure = error
    tried = ", ".join(map(str, candidates[:8])) + (" ..." if len(candidates) > 8 else "") or "none"
    why = "" if failure is None else f"; the last failed with {type(failure).__name__}: " + \
        (str(failure).strip().splitlines() or [""])[0]
    raise ValueError(f"{where}: its forward accepts none of the input channel counts tried ({tried}{why}); pass "
                     "in_channels (Probe(..., in_channels=M))")


def _stride(size: tuple[int, ...], given, kernel: tuple[int, ...], where: str) -> tuple[int, ...]:
    """The stride that gives output ``size`` for a ``_ZERO``-sized input at padding ``k // 2``."""
    fits = [[s for s in range(1, _ZERO + 1) if -(-_ZERO // s) == out] for out in size]
    shown = f"for a {'x'.join([str(_ZERO)] * len(size))} input it returns {'x'.join(map(str, size))}"
    if given is not None:
        given = check_tuple("stride", given, len(size))
        if all(s in f for s, f in zip(given, fits)):
            return given
        real = f", as stride {tuple(f[0] for f in fits)} does" if all(fits) else ""
        raise ValueError(f"{where}: stride {given} was given, but {shown}{real}")
    if not all(fits):
        raise ValueError(f"{where}: {shown}, which no stride gives at padding {tuple(k // 2 for k in kernel)}: not a "
                         "HetConv (its k x k part is padded by k // 2)")
    if any(len(f) > 1 for f in fits):
        raise ValueError(f"{where}: {shown}, which several strides give; pass stride (Probe(..., stride=s))")
    return tuple(f[0] for f in fits)


def _impulse_responses(run, scalar: Tensor, channels: int, bias: Tensor, kernel: tuple[int, ...],
                       stride: tuple[int, ...], where: str) -> Tensor:
    """``weight[n, c, *u]`` (float64) from batched impulses in ``scalar``'s dtype and device. Per
    channel, one sample per offset ``r`` in ``[0, s)`` (per dimension) holds an impulse at
    ``k // 2 + r``; tap ``u`` shows at output ``(k - 1 + r - u) / s`` of the sample with
    ``r = (u - k + 1) mod s``."""
    dims = len(kernel)
    offsets = list(product(*(range(s) for s in stride)))
    size = tuple(k + s - 1 for k, s in zip(kernel, stride))
    grids = torch.meshgrid(*(torch.arange(k) for k in kernel), indexing="ij")
    residues = [(u - k + 1) % s for u, k, s in zip(grids, kernel, stride)]
    sample = torch.zeros(kernel, dtype=torch.long)
    for r, s in zip(residues, stride):
        sample = sample * s + r
    outputs = tuple((k - 1 + r - u) // s for u, r, k, s in zip(grids, residues, kernel, stride))
    chunk = max(1, _BUDGET // (len(offsets) * channels * math.prod(size)))
    weights = []
    for first in range(0, channels, chunk):
        count = min(chunk, channels - first)
        x = scalar.new_zeros((count, len(offsets), channels) + size)
        for i, r in enumerate(offsets):
            place = tuple(k // 2 + ri for k, ri in zip(kernel, r))
            x[(torch.arange(count), i, torch.arange(first, first + count)) + place] = _IMPULSE
        y = run(x.flatten(0, 1))
        if tuple(y.shape[2:]) != tuple(-(-n // s) for n, s in zip(size, stride)):
            raise ValueError(f"{where} returns shape {tuple(y.shape)} for an input of size {size}, not what stride "
                             f"{stride} at padding k // 2 gives: not a convolution of kernel {kernel}")
        y = y.view((count, len(offsets)) + tuple(y.shape[1:]))
        taps = y[(slice(None), sample.to(y.device), slice(None)) + tuple(o.to(y.device) for o in outputs)]
        weights.append(taps.permute((dims + 1, dims) + tuple(range(dims))))  # (*k, count, N) -> (N, count, *k)
    return (torch.cat(weights, 1).double() - bias.view((-1, 1) + (1,) * dims)) / _IMPULSE


def _check(run, scalar: Tensor, weight: Tensor, bias: Tensor, stride: tuple[int, ...], where: str) -> None:
    """The module against the convolution read, on a random input; if they differ, say why."""
    kernel, dtype = tuple(weight.shape[2:]), scalar.dtype
    x = probe_input(weight.shape[1], kernel, weight.device, batch=2)
    got = run(x.to(dtype))
    expected = _CONV[len(kernel)](x, weight, bias, stride, tuple(k // 2 for k in kernel))
    change = relative_change(got, expected) if got.shape == expected.shape else float("inf")
    if change <= _TOLERANCE[dtype]:
        return
    x, other = x.to(dtype), probe_input(weight.shape[1], kernel, weight.device, seed=1, batch=2).to(dtype)
    nonlinear = relative_change(run(x + other), got + run(other) - run(torch.zeros_like(x)))
    if nonlinear > _TOLERANCE[dtype]:
        why = f"it is not linear (f(x + y) differs from f(x) + f(y) - f(0) by {nonlinear:.3g}, relative)"
    else:
        why = (f"it is linear but not a convolution with kernel {kernel}, stride {stride} and padding k // 2 "
               f"(relative difference {change:.3g} on a random input; pass kernel_size if its kernel is larger)")
    _refuse(where, run, x, got, why)


def _refuse(where: str, run, x: Tensor, y: Tensor, why: str) -> None:
    """Raise the ValueError that says why ``module`` is no convolution: ``why``, unless ``y = f(x)``
    changes when ``x`` is given again (randomness, which explains any other symptom)."""
    if relative_change(run(x), y) > 0:
        why = "its output changes from one call to the next on the same input (dropout in training mode?)"
    raise ValueError(f"{where} cannot be read as a convolution: {why}")


# -- the HetConv pattern in a dense weight ------------------------------------------------------------
def find_groups(weight: Tensor, where: str, part: int | None = None) -> tuple[int, Tensor, Tensor]:
    """The HetConv pattern of a dense weight up to permutations (module notes, step 4).

    Args:
        weight (Tensor[N, M, *k]): the dense weight.
        where (str): the module's name for messages.
        part (int, optional): ``P``; default: the largest ``P >= 2`` that fits.

    Returns:
        (int, Tensor[M], Tensor[N]): ``P``, ``p_in`` and ``p_out`` (int64): ``weight[p_out][:, p_in]``
        has every non-centre tap in the blocks of the block pattern of ``P``. Filters and channels keep
        their order within a block and blocks are ordered by their first filter, so the paper's
        shifted pattern gives :func:`~sparse_hetconv.shifted_to_block_permutation` and the block
        pattern the identity.

    Raises:
        ValueError: naming ``where``: only centre taps (a 1 x 1 convolution), taps that do not split
            into equal blocks (with how many filters have taps outside the nearest pattern), or no
            1 x 1 kernels (a grouped or depthwise convolution).
    """
    n_out, n_in = weight.shape[:2]
    for name, channels in (("in_channels", n_in), ("out_channels", n_out)):
        if part and channels % part:
            raise ValueError(f"{where}: {name} ({channels}) must be divisible by part ({part})")
    taps = weight.detach().abs().flatten(2).clone()
    taps[..., taps.shape[-1] // 2] = 0
    linked = (taps.amax(-1) > 0).cpu()  # filter j has a k x k kernel on channel c
    if not linked.any():
        raise ValueError(f"{where} has no k x k taps besides the centre: a 1x1 convolution, not a HetConv")
    groups = _linked_groups(linked)
    parts = [part] if part else [p for p in range(math.gcd(n_out, n_in), 1, -1) if n_out % p == n_in % p == 0]
    blocks = next((b for b in (_pack(groups, p, n_out // p, n_in // p) for p in parts) if b is not None), None)
    if blocks is None:
        raise ValueError(_not_a_hetconv(where, linked, groups, part))
    part = len(blocks)
    p_out = torch.tensor([j for filters, _ in blocks for j in filters])
    p_in = torch.tensor([c for _, channels in blocks for c in channels])
    centre = weight[(slice(None), slice(None)) + tuple(k // 2 for k in weight.shape[2:])].detach().cpu()
    if part > 1 and not centre[p_out][:, p_in].masked_select(HetConvPattern(n_in, n_out, part).mask_1x1()).any():
        raise ValueError(f"{where} is a grouped convolution (groups={part}): every filter reads its own "
                         f"{n_in // part} channels only and has no 1x1 kernels; a grouped or depthwise convolution "
                         "is not a HetConv")
    return part, p_in, p_out


def _linked_groups(linked: Tensor) -> list[tuple[list[int], list[int]]]:
    """The connected groups ``(filters, channels)`` of the bipartite graph ``linked`` (N x M): each
    filter takes the smallest filter index it reaches; unlinked ones form groups of their own."""
    n_out = linked.shape[0]
    label = torch.arange(n_out)
    while True:
        channel = torch.where(linked, label[:, None], n_out).amin(0)
        new = torch.minimum(label, torch.where(linked, channel[None, :], n_out).amin(1))
        if torch.equal(new, label):
            break
        label = new
    groups: dict[object, tuple[list[int], list[int]]] = {}
    for j, at in enumerate(label.tolist()):
        groups.setdefault(at, ([], []))[0].append(j)
    for c, at in enumerate(channel.tolist()):
        groups.setdefault(at if at < n_out else ("channel", c), ([], []))[1].append(c)
    return list(groups.values())


def _pack(groups, part: int, n: int, m: int) -> list[tuple[list[int], list[int]]] | None:
    """``groups`` packed into ``part`` blocks of ``n`` filters and ``m`` channels (first fit,
    largest first; unlinked filters and channels fill the gaps), or None."""
    blocks: list[tuple[list[int], list[int]]] = [([], []) for _ in range(part)]
    for filters, channels in sorted((g for g in groups if g[0] and g[1]), key=lambda g: (-len(g[0]), -len(g[1]))):
        home = next((b for b in blocks if len(b[0]) + len(filters) <= n and len(b[1]) + len(channels) <= m), None)
        if home is None:
            return None
        home[0].extend(filters)
        home[1].extend(channels)
    for side, size in ((0, n), (1, m)):
        for item in sorted(i for g in groups if not (g[0] and g[1]) for i in g[side]):
            next(b for b in blocks if len(b[side]) < size)[side].append(item)
    return sorted((sorted(filters), sorted(channels)) for filters, channels in blocks)


def _not_a_hetconv(where: str, linked: Tensor, groups, part: int | None) -> str:
    n_out, n_in = linked.shape
    filters, channels = max((len(f), len(c)) for f, c in groups)
    text = (f"{where} is not a HetConv: its k x k taps link {filters} of its {n_out} filters and {channels} of its "
            f"{n_in} input channels into one group, which does not split into {part or 'P >= 2'} equal blocks")
    width = Counter(n for n in linked.sum(1).tolist() if n).most_common(1)[0][0]
    guess = part or (n_in // width if n_in % width == 0 else None)
    if guess and guess > 1 and n_out % guess == 0 and n_in % guess == 0:
        j, c = torch.arange(n_out)[:, None], torch.arange(n_in)[None, :]
        masks = {"block": HetConvPattern(n_in, n_out, guess).mask_1x1(), "shifted": (c - j) % guess != 0}
        outside = {name: int((linked & mask).any(1).sum()) for name, mask in masks.items()}
        name = min(outside, key=outside.get)
        text += f"; with part={guess}, taps outside the {name} pattern on {outside[name]} of {n_out} filters"
    return text


def block_weights(weight: Tensor, bias: Tensor | None, part: int, p_in: Tensor, p_out: Tensor, stride,
                  dtype: torch.dtype) -> tuple[HetConvWeights, float]:
    """The block-pattern HetConv in ``weight[p_out][:, p_in]`` (a dense float64 ``Tensor[N, M, *k]``),
    in ``dtype``, and the largest weight it drops (the non-centre taps outside the blocks; 0.0 if none)."""
    device = weight.device
    block = weight[p_out.to(device)][:, p_in.to(device)]
    n_out, n_in, *kernel = block.shape
    pattern = HetConvPattern(n_in, n_out, part, tuple(kernel), len(kernel))
    p, n, m = part, pattern.block_out, pattern.block_in
    index = torch.arange(p, device=device)
    kxk = block.view((p, n, p, m) + pattern.kernel_size)[index, :, index].reshape((n_out, m) + pattern.kernel_size)
    dense = block[(slice(None), slice(None)) + pattern.centre].masked_fill(~pattern.mask_1x1(device), 0)
    new_bias = None if bias is None else bias[p_out.to(bias.device)].to(dtype)
    read = HetConvWeights(pattern, tuple(stride), kxk.to(dtype), dense.to(dtype), new_bias)
    return read, dropped_taps(block, pattern)


def read_probed(module: nn.Module, where: str, spec: Probe) -> tuple[HetConvWeights, Tensor, Tensor]:
    """``module`` read by probing as the block-pattern HetConv weights (in the module's dtype) between
    the permutations ``p_in`` and ``p_out``: ``module(x) == layer(x[:, p_in])[:, argsort(p_out)]``.
    Read in float32 first where that is faster (module notes), in float64 if that fails."""
    tensors = [t for t in chain(module.parameters(), module.buffers()) if t.is_floating_point()]
    dtype = tensors[0].dtype if tensors else torch.get_default_dtype()
    fast = dtype != torch.float64 and all(t.device.type == "cpu" for t in tensors)
    for probe_dtype in (torch.float32, torch.float64)[0 if fast else 1:]:
        try:
            weight, bias, stride = read_convolution(module, where, spec.in_channels, spec.kernel_size, spec.stride,
                                                    probe_dtype)
            part, p_in, p_out = find_groups(weight, where, spec.part)
            break
        except ValueError:
            if probe_dtype == torch.float64:
                raise
    return block_weights(weight, bias, part, p_in, p_out, stride, dtype)[0], p_in, p_out
