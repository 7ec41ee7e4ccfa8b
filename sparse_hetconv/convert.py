"""Converters between the forms of a HetConv model, and from standard CNNs into HetConv ones.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120.

* :func:`to_sparse` — masked layers, and every module that computes a HetConv as a signed sum of
  convolutions (the published ``gwc``/``pwc`` pair, sxpro's ``Efficient_HetConv2d``, ...) ->
  :class:`SparseHetConv2d`, exactly.
* :func:`to_masked` — the exact inverse.
* :func:`hetconvify` — standard ``nn.Conv2d`` k x k layers -> HetConv layers, to fine-tune.
* :func:`sparse_hetconv.shifted.from_shifted` / ``to_shifted`` — the paper's shifted pattern.

All of them work on a deep copy unless ``inplace=True``, keep module names, every other module,
train/eval state, device and dtype, and check the whole model before changing anything: on an
error the input model is untouched. What they share (``_convert``):

* **Every replaced module is checked** to compute what the replacement computes, on a random
  float64 probe run on a hook-free copy (no user hook fires, the module is not changed); an exact
  converter raises a ``ValueError`` naming the path where it does not.
* **Shared modules stay shared**: a module that sits at several paths (weight tying, a block
  reused twice) is converted once and the one replacement is placed at every path; the report
  lists it once (``report.shared`` has the other paths). A replaced module that shares a
  parameter or buffer with a module that is not replaced with it is refused: converting it would
  untie them.
* **Hooks**: forward pre-hooks, forward hooks and backward hooks registered on a replaced module
  itself are moved onto its replacement (same order, same handles: ``handle.remove()`` still
  works), because the replacement takes the same input and returns the same output. Hooks that
  cannot be carried over are refused with a ``ValueError`` naming the path, before anything
  changes: hooks on a replaced module's children (which disappear), ``state_dict`` hooks (the
  keys change), the hook-based ``weight_norm`` / ``spectral_norm`` (remove them first), and, for
  converters that permute a layer's channels (``from_shifted``, ``to_shifted``), any hook on the
  layer.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ._checks import check_bool, check_int, check_model
from ._memory_format import apply_memory_format, check_memory_format
from ._probe import (FORWARD_HOOKS, CopyError, hook_names, no_global_hooks, probe_extent, probe_input, quiet_copy,
                     relative_change, tolerance)
from ._report import ConversionReport
from .backends import check_backend
from .layouts import NotAHetConvError, hetconv_kind, read_hetconv_weights
from .permutation import between_permutations, permutation_finisher
from .probing import ProbeTargets, read_probed
from .sparse import SparseHetConv2d, SparseHetConv3d, _dense_conv_problem, _SparseHetConvNd, check_reduce

__all__ = ["ConversionReport", "hetconvify", "to_masked", "to_sparse"]

_SPARSE_BY_DIMS = {2: SparseHetConv2d, 3: SparseHetConv3d}
_FORMS = ("sparse", "masked")


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _where(path: str, module: nn.Module) -> str:
    return f"module '{path or '<root>'}' ({type(module).__name__})"


def _looks_published(module: nn.Module) -> bool:
    """True for the modules :func:`to_sparse` converts: masked layers, ``gwc``/``pwc`` modules
    (converted or refused), and other signed sums of convolutions that read as an exact HetConv."""
    kind = hetconv_kind(module)
    if kind != "sum":
        return kind is not None
    try:
        read_hetconv_weights(module)
    except NotAHetConvError:
        return False
    return True


@dataclass(eq=False)
class _Step:
    """One module to replace, at every path where it sits."""

    paths: list[str]
    old: nn.Module
    new: nn.Module


def _inside(path: str, prefixes: set[str]) -> bool:
    """``path`` is one of ``prefixes`` or inside one of them (``""``, the root, holds every path)."""
    if "" in prefixes or path in prefixes:
        return True
    parts = path.split(".")
    return any(".".join(parts[:i]) in prefixes for i in range(1, len(parts)))


def _plan(model: nn.Module, build, report: ConversionReport | None = None) -> list[_Step]:
    """Walk the tree top-down; ``build(path, module)`` returns a replacement or None.

    Every path of a shared module is visited (``remove_duplicate=False``) but ``build`` runs once
    per module: its replacement goes to every path. A replaced module's children are not visited.
    Nothing is changed here.
    """
    steps: dict[int, _Step | None] = {}
    order: list[_Step] = []
    replaced: set[str] = set()
    for path, module in model.named_modules(remove_duplicate=False):
        if _inside(path, replaced):
            continue
        key = id(module)
        if key not in steps:
            try:
                new = build(path, module)
            except Exception as error:  # a probe under weight_norm fails in many ways: name the cause
                norm = _norm_in(module)
                if norm:
                    raise ValueError(f"{_where(path, module)} uses {norm}; remove it before converting") from error
                if isinstance(error, CopyError):
                    raise ValueError(f"{_where(path, module)} {error}") from error
                raise
            norm = None if new is None else _norm_in(module)
            if norm:
                raise ValueError(f"{_where(path, module)} uses {norm}; remove it before converting")
            steps[key] = None if new is None else _Step([path], module, new)
            if steps[key] is not None:
                order.append(steps[key])
        elif steps[key] is not None:
            steps[key].paths.append(path)
        if steps[key] is not None:
            replaced.add(path)
    if report is not None:
        report.replaced = [step.paths[0] for step in order]
        report.shared = {step.paths[0]: step.paths[1:] for step in order if len(step.paths) > 1}
    return order


def _check_ties(model: nn.Module, plan: list[_Step]) -> None:
    """Refuse to replace a module whose parameters or buffers are also used outside it."""
    owner: dict[int, tuple[_Step, str]] = {}
    for step in plan:
        for name, tensor in chain(step.old.named_parameters(), step.old.named_buffers()):
            other = owner.get(id(tensor))
            if other is not None and other[0] is not step:
                raise ValueError(f"modules '{other[0].paths[0]}' and '{step.paths[0]}' share the tensor "
                                 f"'{other[1]}' / '{name}'; converting them separately would untie it "
                                 "(share the whole module instead, or untie it first)")
            owner[id(tensor)] = (step, name)
    paths = {path for step in plan for path in step.paths}
    for path, module in model.named_modules(remove_duplicate=False):
        if _inside(path, paths):
            continue
        for name, tensor in chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
            if id(tensor) in owner:
                step, inner = owner[id(tensor)]
                raise ValueError(f"{_where(step.paths[0], step.old)} shares its tensor '{inner}' with "
                                 f"'{path + '.' if path else ''}{name}', which is not converted with it; "
                                 "converting it would untie them (untie them first)")


def _norm_in(module: nn.Module) -> str | None:
    """``weight_norm`` / ``spectral_norm`` (the hook-based ones) anywhere in ``module``: their
    forward pre-hook recomputes ``weight``, which a converted layer does not have."""
    for sub in module.modules():
        for hook in sub._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                return "weight_norm (torch.nn.utils.remove_weight_norm)"
            if isinstance(hook, SpectralNorm):
                return "spectral_norm (torch.nn.utils.remove_spectral_norm)"
    return None


def _check_hooks(plan: list[_Step], carry: bool) -> None:
    """Refuse the hooks that cannot follow their module to its replacement (see the module doc)."""
    advice = "remove them (handle.remove()), convert, and register them on the new layer"
    for step in plan:
        path = step.paths[0]
        for sub_path, sub in step.old.named_modules():
            kinds = hook_names(sub)
            if sub_path and kinds:
                raise ValueError(f"module '{path + '.' if path else ''}{sub_path}' has a {', '.join(kinds)}, but it "
                                 f"disappears when {_where(path, step.old)} is converted; {advice}")
        kinds = hook_names(step.old)
        state = [kind for kind in kinds if "state_dict" in kind]
        if state:
            raise ValueError(f"{_where(path, step.old)} has a {', '.join(state)}, which cannot follow it: "
                             f"the converted layer's state_dict keys differ; {advice}")
        if kinds and not carry:
            raise ValueError(f"{_where(path, step.old)} has a {', '.join(kinds)}, but this converter changes the "
                             f"order of the layer's channels, so the hook would see other tensors; {advice}")


def _move_hooks(old: nn.Module, new: nn.Module) -> bool:
    if not hook_names(old, state=False):
        return False
    for name in FORWARD_HOOKS:
        if hasattr(old, name):
            setattr(new, name, getattr(old, name))
            setattr(old, name, OrderedDict())
    new._is_full_backward_hook = getattr(old, "_is_full_backward_hook", None)
    return True


def _apply(model: nn.Module, plan: list[_Step]) -> nn.Module:
    for step in plan:
        for path in step.paths:
            if not path:
                return step.new
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, name, step.new)
    return model


def _verify(path: str, old: nn.Module, new: nn.Module, exact: bool = True, channels: int | None = None,
            kernel_size: tuple[int, ...] | None = None) -> float:
    """``new`` against ``old`` on a float64 probe (hooks off); the relative output change.

    With ``exact``, a change beyond the rounding of ``old``'s dtype is a ``ValueError`` naming the
    path: the module does not compute what the pattern it was read as says. ``channels`` and
    ``kernel_size`` size the probe (default: ``new``'s attributes).
    """
    tensor = next(chain(new.parameters(), new.buffers()))
    channels = new.in_channels if channels is None else channels
    kernel_size = probe_extent(new) if kernel_size is None else tuple(kernel_size)
    x = probe_input(channels, kernel_size, tensor.device)
    with torch.no_grad(), no_global_hooks():
        change = relative_change(quiet_copy(new)(x), quiet_copy(old)(x))
    dtype = next(chain(old.parameters(), old.buffers()), tensor).dtype
    if exact and not change <= tolerance(dtype):
        raise ValueError(f"{_where(path, old)} does not compute the HetConv it was read as: the converted layer's "
                         f"output differs by {change:.3g} (relative) on a test input; it cannot be converted exactly")
    return change


def _convert(model, build, inplace: bool, what: str, memory_format=None, return_report: bool = False, *,
             report: ConversionReport | None = None, carry_hooks: bool = True, finish=None, empty: str | None = None):
    """The steps every converter shares: check, plan (``build`` per module), check ties and hooks,
    apply, ``finish(model, report)`` (e.g. absorb permutations), memory format, report."""
    check_model(model)
    check_bool("inplace", inplace)
    check_bool("return_report", return_report)
    check_memory_format(memory_format)
    report = ConversionReport(what) if report is None else report
    report.params_before = _params(model)
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except RuntimeError as error:  # torch refuses to copy e.g. a model under the old weight_norm
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"{what}: the model cannot be deep-copied ({first}); pass inplace=True or remove "
                             "what prevents the copy (torch.nn.utils.remove_weight_norm)") from error
    plan = _plan(model, build, report)  # raises before anything is changed; the input is never touched
    _check_ties(model, plan)
    _check_hooks(plan, carry_hooks)
    if not plan:
        skipped = "".join(f"; skipped {p or '<root>'}: {why}" for p, why in report.skipped.items())
        warnings.warn(empty or f"{what}: the model has no layer to convert; returned it unchanged{skipped}",
                      stacklevel=3)
    report.hooks = [step.paths[0] for step in plan if _move_hooks(step.old, step.new)]
    model = _apply(model, plan)
    if finish is not None:
        model = finish(model, report)
    model = apply_memory_format(model, memory_format)
    report.params_after = _params(model)
    return (model, report) if return_report else model


def to_sparse(model: nn.Module, inplace: bool = False, backend: str = "auto",
              memory_format=torch.channels_last, return_report: bool = False, probe=None) -> nn.Module:
    """Turn every HetConv in ``model`` that is computed as a sum of convolutions into a
    :class:`SparseHetConv2d` (or ``3d``), exactly.

    Converted (docs/design.md §4; :func:`~sparse_hetconv.layouts.read_hetconv_weights` has the
    details):

    * :class:`MaskedHetConv2d` / ``3d``; one whose ``gwc``/``pwc`` no longer match its declared
      ``part``, kernel size or stride is refused.
    * Modules with children ``gwc`` (a grouped k x k convolution, padding ``k // 2``) and ``pwc``
      (a 1 x 1 convolution, any ``groups``), the published layout: refused with the module path
      if they are not an exact HetConv.
    * Any other module whose only children are convolutions of one dimension, at least one a
      grouped k x k and one a 1 x 1, with the same channels and stride, when its forward returns
      a signed sum of them: sxpro's ``Efficient_HetConv2d`` (``conv3x3 + conv1x1 - conv1x1_``,
      all with bias) and the like. A module with such children whose forward is something else
      (a depthwise-separable ``pw(dw(x))`` has the same children) is left alone and listed in
      ``report.skipped`` with the reason.
    * With ``probe``: the modules it names, **read by probing** (:mod:`sparse_hetconv.probing`,
      docs/conversion.md): any module that computes a HetConv up to a permutation of its channels,
      whatever its code. The permutations are absorbed by the neighbours as
      :func:`~sparse_hetconv.shifted.from_shifted` does, or kept as
      :class:`~sparse_hetconv.ChannelPermutation` modules (``report.permutations``). A named module
      that is not a linear, stateless, deterministic HetConv is a ``ValueError`` naming its path;
      ``report.probed`` lists these layers.

    Every converted module is checked against its replacement on a random float64 input run on a
    hook-free copy. A non-zero pointwise block diagonal is folded into the centre taps, so unmasked
    "approximate HetConv" models convert exactly too; the paper's *shifted* pattern is
    :func:`~sparse_hetconv.shifted.from_shifted`'s job. Shared modules and hooks: see the module
    docstring.

    Args:
        model (nn.Module): the model (or a single layer).
        inplace (bool): change ``model`` itself instead of a deep copy.
        backend (str): the ``backend`` of the new sparse layers.
        memory_format (torch.memory_format or None): layout given to every 4-D (5-D) parameter
            and buffer of the result; ``torch.channels_last`` (default) makes the activations
            channels-last end to end, the fast layout on the CPU; None leaves them as they are.
        return_report (bool): also return a :class:`ConversionReport` (replaced, skipped and why,
            shared, hooks moved, which layers were read by probing; ``report.exact`` is always True
            here).
        probe (optional): a module class, a str or a :class:`~sparse_hetconv.probing.Probe`, or a
            list of them: the modules to convert by probing (see above). A path the model does not
            have is a ``ValueError``; a target that matches nothing, a warning.

    Returns:
        nn.Module: the converted model (with ``return_report``: ``(model, report)``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a masked or ``gwc``/``pwc`` module that is not an exact HetConv, a probed module
            that is not one, a replaced module that shares a tensor with one that is not replaced,
            a hook that cannot be carried over; the message names the path, and ``model`` is left
            untouched.

    Example:
        >>> masked = nn.Sequential(MaskedHetConv2d(16, 16, part=4), nn.ReLU())
        >>> type(to_sparse(masked)[0]).__name__
        'SparseHetConv2d'
        >>> import torch.nn.functional as F
        >>> class MyHetConv(nn.Module):  # any HetConv code: here one masked dense convolution
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.randn(8, 8, 3, 3) * shifted_mask(8, 8, part=4))
        ...     def forward(self, x):
        ...         return F.conv2d(x, self.weight, padding=1)
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), MyHetConv(), nn.ReLU(), MyHetConv())
        >>> new, report = to_sparse(model, probe=[MyHetConv], return_report=True)
        >>> report.probed, type(new[1]).__name__, new[1].part
        (['1', '3'], 'SparseHetConv2d', 4)
    """

    check_backend(backend)
    check_model(model)
    targets = None if probe is None else ProbeTargets(probe, model)
    report = ConversionReport("to_sparse", form="sparse")
    wrappers: set[int] = set()

    def build(path, module):
        spec = None if targets is None else targets.match(path, module)
        if spec is not None:
            read, p_in, p_out = read_probed(module, _where(path, module), spec)
            layer = _SPARSE_BY_DIMS[read.pattern.dims]._from_weights(read, backend).train(module.training)
            new = between_permutations(p_in, layer, torch.argsort(p_out))
            _verify(path, module, new, channels=read.pattern.in_channels, kernel_size=read.pattern.kernel_size)
            report.probed.append(path)
            if new is not layer:
                wrappers.add(id(new))
            return new
        if hetconv_kind(module) is None:
            return None
        try:
            read = read_hetconv_weights(module, path)
        except NotAHetConvError as error:
            report.skipped[path] = (f"{error} (if it computes a HetConv another way, probe=[{type(module).__name__}] "
                                    "reads it from its responses)")
            return None
        new = _SPARSE_BY_DIMS[read.pattern.dims]._from_weights(read, backend).train(module.training)
        _verify(path, module, new)
        return new

    result = _convert(model, build, inplace, "to_sparse", memory_format, return_report, report=report,
                      finish=permutation_finisher(wrappers, []))
    if targets is not None:
        targets.warn_unused("to_sparse")
    return result


def to_masked(model: nn.Module, inplace: bool = False, memory_format=torch.channels_last,
              return_report: bool = False) -> nn.Module:
    """Turn every :class:`SparseHetConv2d` (``3d``) in ``model`` into a :class:`MaskedHetConv2d`.

    The exact inverse of :func:`to_sparse`: ``to_masked(to_sparse(m))`` computes what ``m`` did,
    with the published module layout (``gwc``/``pwc`` keys), e.g. to save a checkpoint for code
    that expects it. Copies unless ``inplace=True``. ``memory_format`` and ``return_report`` as for
    :func:`to_sparse` (memory formats never change a checkpoint: ``state_dict`` tensors compare
    equal either way). Each layer is checked on a probe; shared layers stay shared and hooks
    follow as for :func:`to_sparse`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """

    def build(path, module):
        if not isinstance(module, _SparseHetConvNd):
            return None
        new = module.to_masked()
        _verify(path, module, new)
        return new

    return _convert(model, build, inplace, "to_masked", memory_format, return_report,
                    report=ConversionReport("to_masked", form="masked"))


def _dense_candidate(path: str, module: nn.Module, part: int, skip_first: bool, include, seen_first: list[str],
                     report: ConversionReport) -> int | None:
    """The dimension of a standard convolution that may become a HetConv of ``part``, or None
    (with the reason in ``report.skipped`` for a convolution left alone): ``hetconvify``'s and
    ``from_shifted``'s shared rule (the first convolution with ``skip_first``, ``include``, and
    what :func:`_dense_conv_problem` refuses)."""
    if type(module) not in (nn.Conv2d, nn.Conv3d):
        return None
    dims = 2 if isinstance(module, nn.Conv2d) else 3
    if skip_first and not seen_first:
        seen_first.append(path)
        report.skipped[path] = "first convolution (skip_first=True)"
        return None
    if include is not None and not include(path, module):
        report.skipped[path] = "excluded by include()"
        return None
    reason = _dense_conv_problem(module, part, dims)
    if reason:
        report.skipped[path] = reason
        return None
    return dims


def hetconvify(
    model: nn.Module,
    part: int,
    form: str = "sparse",
    skip_first: bool = True,
    reduce: str = "center",
    include=None,
    inplace: bool = False,
    backend: str = "auto",
    memory_format=torch.channels_last,
    return_report: bool = False,
):
    """Replace standard k x k convolutions by HetConv layers initialised from their weights.

    Every ``nn.Conv2d`` / ``nn.Conv3d`` with ``groups=1``, an odd kernel larger than 1 with padding
    at most ``dilation * (k // 2)`` (its dilation and padding mode are kept) and channels divisible
    by ``part`` becomes a HetConv: the k x k
    kernels on the pattern's blocks are kept exactly and every other kernel is reduced to a 1 x 1
    weight (``reduce="center"``: its centre tap; ``"sum"``: the sum of its taps). The output
    changes (fine-tune afterwards) unless the dropped taps are zero, as in a dense convolution
    trained under a block-pattern mask: ``report.exact`` says which, and ``report.dropped`` gives
    each inexact layer's largest dropped weight and relative output change on a probe. This is
    how a pretrained standard CNN becomes a HetConv one. A convolution shared at several paths is
    converted once (its ``include`` decision is taken at its first path); shared modules and hooks
    as for :func:`to_sparse`. For the paper's shifted pattern use
    :func:`sparse_hetconv.shifted.from_shifted` with ``part``.

    Args:
        model (nn.Module): the model.
        part (int): ``P`` for every replaced layer.
        form (str): ``"sparse"`` (:class:`SparseHetConv2d`) or ``"masked"``.
        skip_first (bool): leave the first convolution (module order) alone, as the paper does
            with the RGB stem. Default True.
        reduce (str): ``"center"`` or ``"sum"``, see above.
        include (callable, optional): ``include(path, conv) -> bool``; False skips the layer.
        inplace (bool): change ``model`` itself instead of a deep copy.
        backend (str): ``backend`` of new sparse layers.
        memory_format (torch.memory_format or None): as for :func:`to_sparse`.
        return_report (bool): also return the :class:`ConversionReport` (what was replaced,
            skipped and why, and exactness). Default False: the model alone.

    Returns:
        nn.Module, or ``(nn.Module, ConversionReport)`` with ``return_report=True``.

    Raises:
        TypeError / ValueError: bad arguments, a shared tensor or a hook that cannot be carried
            over, before anything is changed.
    """
    check_model(model)
    check_int("part", part)
    if form not in _FORMS:
        raise ValueError(f"form ({form!r}) must be one of {_FORMS}")
    check_bool("skip_first", skip_first)
    check_bool("inplace", inplace)
    reduce = check_reduce(reduce)
    if include is not None and not callable(include):
        raise TypeError(f"include must be callable or None, got {type(include).__name__}")
    check_backend(backend)
    check_memory_format(memory_format)
    check_bool("return_report", return_report)
    report = ConversionReport("hetconvify", part=part, form=form)
    seen_first = []

    def build(path, module):
        dims = _dense_candidate(path, module, part, skip_first, include, seen_first, report)
        if dims is None:
            return None
        sparse, layer = _SPARSE_BY_DIMS[dims].from_conv(module, part, reduce, backend, return_report=True)
        if not layer.exact:
            report.dropped[path] = layer.dropped[""]
        return sparse if form == "sparse" else sparse.to_masked()

    empty = f"hetconvify: no convolution could be replaced with part={part}; see the report"
    model, report = _convert(model, build, inplace, "hetconvify", memory_format, True, report=report, empty=empty)
    return (model, report) if return_report else model

