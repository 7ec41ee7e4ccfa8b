"""Converters between the forms of a HetConv model, and from standard CNNs into HetConv ones.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120.

* :func:`to_sparse` — masked (and published ``gwc``/``pwc``) layers -> :class:`SparseHetConv2d`.
* :func:`to_masked` — the exact inverse.
* :func:`hetconvify` — standard ``nn.Conv2d`` k x k layers -> HetConv layers, to fine-tune.

All of them work on a deep copy unless ``inplace=True``, keep module names, every other module,
train/eval state, device and dtype, and check the whole model before changing anything: on an
error the input model is untouched. Hooks registered on a replaced module are not carried over.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ._checks import check_int
from ._memory_format import apply_memory_format, check_memory_format
from .masked import _MaskedHetConvNd, read_hetconv_weights
from .backends import check_backend
from .sparse import SparseHetConv2d, SparseHetConv3d, _dense_conv_problem, _SparseHetConvNd, check_reduce

__all__ = ["ConversionReport", "hetconvify", "to_masked", "to_sparse"]

_SPARSE_BY_DIMS = {2: SparseHetConv2d, 3: SparseHetConv3d}
_FORMS = ("sparse", "masked")


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def _looks_published(module: nn.Module) -> bool:
    return isinstance(module, _MaskedHetConvNd) or (
        isinstance(getattr(module, "gwc", None), nn.Module) and isinstance(getattr(module, "pwc", None), nn.Module)
    )


def _plan(model: nn.Module, build) -> list[tuple[str, nn.Module]]:
    """Walk the tree top-down; ``build(path, module)`` returns a replacement or None.

    A replaced module's children are not visited. Nothing is changed here.
    """
    plan, skip = [], []
    for path, module in model.named_modules():
        if any(path == s or path.startswith(s + ".") for s in skip):
            continue
        new = build(path, module)
        if new is not None:
            plan.append((path, new))
            skip.append(path)
    return plan


def _apply(model: nn.Module, plan: list[tuple[str, nn.Module]]) -> nn.Module:
    for path, new in plan:
        if not path:
            return new
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, new)
    return model


def _convert(model, build, inplace: bool, what: str, memory_format=None, return_report: bool = False):
    _check_model(model)
    _check_bool("inplace", inplace)
    _check_bool("return_report", return_report)
    check_memory_format(memory_format)
    report = ConversionReport(what, params_before=_params(model))
    if not inplace:
        model = copy.deepcopy(model)
    plan = _plan(model, build)  # raises before anything is changed; the input is never touched
    if not plan:
        warnings.warn(f"{what}: the model has no layer to convert; returned it unchanged", stacklevel=3)
    model = apply_memory_format(_apply(model, plan), memory_format)
    report.replaced = [path for path, _ in plan]
    report.params_after = _params(model)
    return (model, report) if return_report else model


def to_sparse(model: nn.Module, inplace: bool = False, backend: str = "auto",
              memory_format=torch.channels_last, return_report: bool = False) -> nn.Module:
    """Turn every masked HetConv in ``model`` into a :class:`SparseHetConv2d` (or ``3d``).

    Converted: :class:`MaskedHetConv2d` / ``3d``, and every module shaped like the published
    HetConv: children ``gwc`` (a grouped k x k convolution, padding ``k // 2``) and ``pwc`` (a 1 x 1
    convolution) with matching channels and stride and output ``gwc(x) + pwc(x)``. The result is
    exact. A non-zero ``pwc`` block diagonal is folded into ``gwc``'s centre taps (docs/design.md
    section 4), so unmasked "approximate HetConv" models, trained without gradient masking,
    convert exactly too. ``model`` itself may be such a layer.

    Args:
        model (nn.Module): the model (or a single layer).
        inplace (bool): change ``model`` itself instead of a deep copy.
        backend (str): the ``backend`` of the new sparse layers.
        memory_format (torch.memory_format or None): layout given to every 4-D (5-D) parameter
            and buffer of the result; ``torch.channels_last`` (default) makes the activations
            channels-last end to end, the fast layout on the CPU; None leaves them as they are.
        return_report (bool): also return a :class:`ConversionReport`.

    Returns:
        nn.Module: the converted model (with ``return_report``: ``(model, report)``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a module with ``gwc``/``pwc`` children that is not an exact HetConv; the
            message names its path, and ``model`` is left untouched.

    Example:
        >>> masked = nn.Sequential(MaskedHetConv2d(16, 16, part=4), nn.ReLU())
        >>> type(to_sparse(masked)[0]).__name__
        'SparseHetConv2d'
    """

    check_backend(backend)

    def build(path, module):
        if not _looks_published(module):
            return None
        read = read_hetconv_weights(module, path)
        return _SPARSE_BY_DIMS[read.pattern.dims]._from_weights(read, backend).train(module.training)

    return _convert(model, build, inplace, "to_sparse", memory_format, return_report)


def to_masked(model: nn.Module, inplace: bool = False, memory_format=torch.channels_last,
              return_report: bool = False) -> nn.Module:
    """Turn every :class:`SparseHetConv2d` (``3d``) in ``model`` into a :class:`MaskedHetConv2d`.

    The exact inverse of :func:`to_sparse`: ``to_masked(to_sparse(m))`` computes what ``m`` did,
    with the published module layout (``gwc``/``pwc`` keys), e.g. to save a checkpoint for code
    that expects it. Copies unless ``inplace=True``. ``memory_format`` and ``return_report`` as for
    :func:`to_sparse` (memory formats never change a checkpoint: ``state_dict`` tensors compare
    equal either way).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """

    def build(path, module):
        return module.to_masked() if isinstance(module, _SparseHetConvNd) else None

    return _convert(model, build, inplace, "to_masked", memory_format, return_report)


@dataclass
class ConversionReport:
    """What a converter did (``return_report=True``): layers replaced and skipped, parameters.

    Attributes:
        converter (str): ``"to_sparse"``, ``"to_masked"`` or ``"hetconvify"``.
        replaced (list of str): paths of the modules replaced, in module order.
        skipped (dict): path -> why a candidate was left alone (``hetconvify``).
        params_before (int), params_after (int): stored parameter elements of the model before
            and after (shared parameters once).
        part (int or None), form (str or None): ``hetconvify``'s settings.
    """

    converter: str
    replaced: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    part: int | None = None
    form: str | None = None

    @property
    def reduction(self) -> float:
        """Parameters after / before (1.0 when nothing changed)."""
        return self.params_after / self.params_before if self.params_before else 1.0

    def __str__(self) -> str:
        settings = f"(part={self.part}, form={self.form!r})" if self.part is not None else ""
        lines = [f"{self.converter}{settings}: replaced {len(self.replaced)} layers, skipped {len(self.skipped)}; "
                 f"parameters {self.params_before:,} -> {self.params_after:,} ({self.reduction:.1%})"]
        lines += [f"  replaced {name or '<root>'}" for name in self.replaced]
        lines += [f"  skipped  {name or '<root>'}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


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
    return_report: bool | None = None,
):
    """Replace standard k x k convolutions by HetConv layers initialised from their weights.

    Every ``nn.Conv2d`` / ``nn.Conv3d`` with ``groups=1``, dilation 1, an odd kernel larger than
    1 with padding ``k // 2`` and channels divisible by ``part`` becomes a HetConv: the k x k
    kernels on the pattern's blocks are kept exactly and every other kernel is reduced to a 1 x 1
    weight (``reduce="center"``: its centre tap; ``"sum"``: the sum of its taps). The output
    changes (fine-tune afterwards). This is how a pretrained standard CNN becomes a HetConv one.

    Args:
        model (nn.Module): the model.
        part (int): ``P`` for every replaced layer.
        form (str): ``"sparse"`` (:class:`SparseHetConv2d`) or ``"masked"``.
        skip_first (bool): leave the first convolution (module order) alone, as the paper does
            with the RGB stem. Default True.
        reduce (str): ``"center"`` or ``"sum"``, see above (``"centre"``: deprecated spelling).
        include (callable, optional): ``include(path, conv) -> bool``; False skips the layer.
        inplace (bool): change ``model`` itself instead of a deep copy.
        backend (str): ``backend`` of new sparse layers.
        memory_format (torch.memory_format or None): as for :func:`to_sparse`.
        return_report (bool): also return the :class:`ConversionReport` (what was replaced,
            skipped and why). Not given: ``(model, report)`` as in 0.1, with a
            ``DeprecationWarning``; from 0.3 the model alone, like the other converters.

    Returns:
        nn.Module, or ``(nn.Module, ConversionReport)`` with ``return_report=True``.

    Raises:
        TypeError / ValueError: bad arguments, before anything is changed.
    """
    _check_model(model)
    check_int("part", part)
    if form not in _FORMS:
        raise ValueError(f"form ({form!r}) must be one of {_FORMS}")
    _check_bool("skip_first", skip_first)
    _check_bool("inplace", inplace)
    reduce = check_reduce(reduce)
    if include is not None and not callable(include):
        raise TypeError(f"include must be callable or None, got {type(include).__name__}")
    check_backend(backend)
    check_memory_format(memory_format)
    legacy = return_report is None
    if legacy:
        warnings.warn("hetconvify returns (model, report) without return_report; pass return_report=True to keep "
                      "the report or return_report=False for the model alone (the default from 0.3)",
                      DeprecationWarning, stacklevel=2)
    else:
        _check_bool("return_report", return_report)
    report = ConversionReport("hetconvify", part=part, form=form, params_before=_params(model))
    seen_first = []

    def build(path, module):
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
        report.replaced.append(path)
        sparse = _SPARSE_BY_DIMS[dims].from_conv(module, part, reduce, backend)
        return sparse if form == "sparse" else sparse.to_masked()

    if not inplace:
        model = copy.deepcopy(model)
    plan = _plan(model, build)
    model = apply_memory_format(_apply(model, plan), memory_format)
    report.params_after = _params(model)
    if not plan:
        warnings.warn(f"hetconvify: no convolution could be replaced with part={part}; see the report",
                      stacklevel=2)
    return (model, report) if legacy or return_report else model


def __getattr__(name: str):
    if name == "HetConvifyReport":  # 0.1 name
        warnings.warn("HetConvifyReport is deprecated; use ConversionReport", DeprecationWarning, stacklevel=2)
        return ConversionReport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
