"""Counting multiply-accumulates and parameters the way the HetConv paper does.

The paper's "FLOPs" are multiply-accumulates (MACs, no factor 2) of the kernels that exist: a
HetConv layer costs ``N (k^2 M/P + M - M/P)`` per output pixel, whatever form computes it. This
module reports both **useful** MACs (the paper's convention, the same in every form) and
**executed** MACs (the masked form's full 1 x 1 convolution, the ``dense`` backend's likewise; the
other backends only the existing kernels). A module counts as a HetConv by what it computes: any
module :func:`to_sparse` converts exactly by its layout
(:func:`~sparse_hetconv.layouts.read_hetconv_weights`) counts its pattern's useful MACs and the
parameters of the layer ``to_sparse`` makes of it.

Convolutions count ``in/groups * prod(kernel)`` per output element, ``nn.Linear`` ``in_features``,
BatchNorm one (its inference-time scale, which folds into the layer before it); additions,
activations and pooling are not counted. With BatchNorm this reproduces the paper's VGG-16 /
CIFAR-10 column within 0.5 % for every ``P`` (exactly, 313.74 M, at ``P = 1``); ``norm=False``
counts convolutions and linear layers only (half of ``FlopCounterMode``'s FLOPs for standard layers).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ._checks import check_model
from .layouts import hetconv_kind, read_hetconv_weights
from .masked import _MaskedHetConvNd
from .pattern import HetConvPattern
from .sparse import _SparseHetConvNd

__all__ = ["LayerCount", "ModelCounts", "PAPER_VGG16_CIFAR10_MMACS", "count_model", "count_macs", "count_params"]

#: The paper's Table 1 (VGG-16 on CIFAR-10): "FLOPs" in millions (MACs) per P.
PAPER_VGG16_CIFAR10_MMACS = {1: 313.74, 2: 175.23, 4: 105.98, 8: 71.35, 16: 54.04, 32: 45.38, 64: 41.05}

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Sparse backends that run the 1 x 1 part as a full N x M product (zeros included).
_FULL_1X1_BACKENDS = ("dense",)


@dataclass
class LayerCount:
    """Counts of one module (summed over its calls in one forward pass).

    Attributes:
        name (str): the module's path in the model (``""`` for the model itself).
        kind (str): the module's class name.
        output_shape (tuple): shape of its (last) output; ``()`` if it never ran.
        useful_macs (int): MACs of the existing kernels (the paper's convention).
        executed_macs (int): MACs the module really computes.
        params (int): parameters of the existing kernels (the masked form's zeros left out).
        stored_params (int): parameter elements the module stores.
        counted (bool): False for a module with parameters but no MAC handler.
        backend (str): for a sparse HetConv layer, the backend that computed its 1 x 1 part.
    """

    name: str
    kind: str
    output_shape: tuple = ()
    useful_macs: int = 0
    executed_macs: int = 0
    params: int = 0
    stored_params: int = 0
    counted: bool = True
    backend: str = ""


@dataclass
class ModelCounts:
    """Per-layer counts of a model for one input size, with totals (:func:`count_model`)."""

    input_size: tuple[int, ...]
    layers: list[LayerCount] = field(default_factory=list)

    @property
    def useful_macs(self) -> int:
        """Total MACs of the existing kernels: the paper's convention (:func:`count_macs`)."""
        return sum(row.useful_macs for row in self.layers)

    @property
    def executed_macs(self) -> int:
        """Total MACs the model really computes in its present form."""
        return sum(row.executed_macs for row in self.layers)

    @property
    def params(self) -> int:
        """Parameters of the existing kernels (:func:`count_params`)."""
        return sum(row.params for row in self.layers)

    @property
    def stored_params(self) -> int:
        """Parameter elements stored, zeros included (``sum(p.numel())``)."""
        return sum(row.stored_params for row in self.layers)

    def table(self) -> str:
        """The per-layer breakdown as plain text, with a total row."""
        head = (f"{'layer':<28}{'type':<26}{'output':<20}{'useful MACs':>15}{'executed MACs':>15}"
                f"{'params':>12}{'stored':>12}")
        lines = [f"input {tuple(self.input_size)}", head, "-" * len(head)]
        for row in self.layers:
            kind = row.kind + (f"[{row.backend}]" if row.backend else "") + ("" if row.counted else "*")
            shape = "x".join(map(str, row.output_shape)) or "-"
            lines.append(f"{(row.name or '<model>')[:27]:<28}{kind[:25]:<26}{shape[:19]:<20}"
                         f"{row.useful_macs:>15,}{row.executed_macs:>15,}{row.params:>12,}{row.stored_params:>12,}")
        lines.append("-" * len(head))
        lines.append(f"{'total':<74}{self.useful_macs:>15,}{self.executed_macs:>15,}{self.params:>12,}"
                     f"{self.stored_params:>12,}")
        if any(not row.counted for row in self.layers):
            lines.append("* no MAC handler for this type: its MACs are not counted")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# -- handlers: (module, input, output) -> (useful, executed) ------------------------------------
def _conv_macs(module: nn.Module, input: torch.Tensor, output: torch.Tensor) -> tuple[int, int]:
    per_output = module.in_channels // module.groups * _prod(module.kernel_size)
    macs = output.numel() * per_output
    return macs, macs


def _linear_macs(module: nn.Linear, input: torch.Tensor, output: torch.Tensor) -> tuple[int, int]:
    macs = output.numel() * module.in_features
    return macs, macs


def _norm_macs(module: nn.Module, input: torch.Tensor, output: torch.Tensor) -> tuple[int, int]:
    return output.numel(), output.numel()


def _masked_macs(module: _MaskedHetConvNd, input: torch.Tensor, output: torch.Tensor) -> tuple[int, int]:
    pixels = output.numel() // module.out_channels
    p = module.pattern
    return pixels * p.useful_macs_per_pixel(), pixels * p.masked_macs_per_pixel()


def _published_handler(pattern: HetConvPattern, convs: Sequence[nn.Module]):
    """The handler of a module that computes a signed sum of convolutions (the published
    ``gwc(x) + pwc(x)``, sxpro's ``conv3x3(x) + conv1x1(x) - conv1x1_(x)``): useful MACs of its
    pattern, executed MACs the sum of what its convolutions run (each with its own ``groups`` and
    kernel; they share the output size: same channels and stride, padding ``k // 2``)."""
    executed_per_pixel = sum(pattern.out_channels * (conv.in_channels // conv.groups) * _prod(conv.kernel_size)
                             for conv in convs)

    def macs(module: nn.Module, input: torch.Tensor, output: torch.Tensor) -> tuple[int, int]:
        pixels = output.numel() // pattern.out_channels
        return pixels * pattern.useful_macs_per_pixel(), pixels * executed_per_pixel
    return macs


def _hetconv_pattern(module: nn.Module, name: str) -> tuple[HetConvPattern, bool] | None:
    """``(pattern, has a bias)`` of a module that computes a HetConv exactly, whatever its class;
    None for any other module."""
    if isinstance(module, _SparseHetConvNd):
        return module.pattern, module.bias is not None
    if isinstance(module, _MaskedHetConvNd):
        return module.pattern, module.gwc.bias is not None
    if hetconv_kind(module) is None:
        return None
    try:  # the recognition to_sparse uses (one probe: a "sum" module is not read twice)
        read = read_hetconv_weights(module, name)
    except ValueError:  # (NotAHetConvError included) convolutions, but not an exact HetConv:
        return None     # they count as they are
    return read.pattern, read.bias is not None


def _sparse_macs(module: _SparseHetConvNd, input: torch.Tensor, output: torch.Tensor) -> tuple[int, int, str]:
    pixels = output.numel() // module.out_channels
    p = module.pattern
    useful = pixels * p.useful_macs_per_pixel()
    if p.part == 1:
        return useful, useful, ""
    backend = module.resolved_backend  # what the call that fired this hook used
    if backend in _FULL_1X1_BACKENDS:  # the values are scattered into a zero N x M matrix
        return useful, pixels * p.masked_macs_per_pixel(), backend
    return useful, useful, backend  # the other backends multiply the existing kernels only


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _handler(module: nn.Module, norm: bool, hetconv: tuple[HetConvPattern, bool] | None = None):
    if isinstance(module, _MaskedHetConvNd):
        return _masked_macs
    if isinstance(module, _SparseHetConvNd):
        return _sparse_macs
    if hetconv is not None:
        convs = [child for child in module.children() if isinstance(child, _CONVS)]
        return _published_handler(hetconv[0], convs)
    if isinstance(module, _CONVS):
        return _conv_macs
    if isinstance(module, nn.Linear):
        return _linear_macs
    if isinstance(module, _NORMS):
        return _norm_macs if norm else (lambda m, i, o: (0, 0))
    return None


def _own_params(module: nn.Module, seen: set[int], hetconv: tuple[HetConvPattern, bool] | None = None
                ) -> tuple[int, int]:
    """(useful, stored) parameters of ``module`` and its descendants not counted yet; a HetConv's
    useful parameters are its pattern's (the masked form's zeroed diagonal is no kernel, and the
    published form's two biases are one)."""
    stored = 0
    for param in module.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            stored += param.numel()
    if hetconv is None or stored == 0:  # (stored 0: parameters shared with a module counted before)
        return stored, stored
    pattern, bias = hetconv
    return pattern.num_params(bias), stored


def _hetconv_units(model: nn.Module) -> list[tuple[str, nn.Module, tuple[HetConvPattern, bool]]]:
    """Every module of ``model`` that computes a HetConv (outermost first; none inside another)."""
    units, skip = [], []
    for name, module in model.named_modules():
        if any(prefix == "" or name.startswith(prefix + ".") for prefix in skip):
            continue
        hetconv = _hetconv_pattern(module, name)
        if hetconv is not None:
            units.append((name, module, hetconv))
            skip.append(name)
    return units


def _check_input_size(input_size: object) -> tuple[int, ...]:
    example = "(batch, channels, *spatial), e.g. (1, 3, 32, 32)"
    if isinstance(input_size, torch.Tensor):
        raise TypeError(f"input_size must be a sequence of ints {example}, got a torch.Tensor of shape "
                        f"{tuple(input_size.shape)}; pass its .shape")
    if not isinstance(input_size, Sequence) or isinstance(input_size, str) or len(input_size) < 2:
        raise ValueError(f"input_size ({input_size!r}) must be a sequence of at least 2 ints: {example}")
    for i, size in enumerate(input_size):
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"input_size ({input_size!r}) must hold ints: element {i} is {size!r} "
                            f"({type(size).__name__})")
        if size < 1:
            raise ValueError(f"input_size ({input_size!r}) must hold ints >= 1: element {i} is {size}")
    return tuple(input_size)


def _run_located(model: nn.Module, x: torch.Tensor, size: tuple[int, ...]) -> None:
    """``model(x)``; if it fails, a ``ValueError`` naming the input size and the innermost module
    that was running (pre-hooks keep the stack of modules entered and not yet left)."""
    names = {module: name for name, module in model.named_modules()}
    stack: list[str] = []

    def enter(module, args):
        stack.append(names.get(module, "?"))

    def leave(module, args, output):
        if stack:
            stack.pop()

    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        model(x)
    except Exception as error:  # any failure of the forward: the input size does not fit the model
        where = stack[-1] if stack else ""
        kind = type(model.get_submodule(where)).__name__ if stack else type(model).__name__
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"the model cannot take an input of size {size}: module '{where or '<model>'}' "
                         f"({kind}) failed: {first}") from error
    finally:
        for handle in handles:
            handle.remove()


def count_model(model: nn.Module, input_size: Sequence[int], norm: bool = True) -> ModelCounts:
    """Count useful and executed MACs and parameters of every layer in one forward pass.

    The model runs once in eval mode under ``torch.no_grad()`` on a zero input of ``input_size``
    (with the device and dtype of its first parameter); its train/eval flags are restored and no
    state changes (BatchNorm running statistics are not updated in eval mode). HetConv layers are
    counted as units (the ``gwc``/``pwc`` children of a masked or published one are not counted again).

    Args:
        model (nn.Module): any model; HetConv layers are recognised in every form: sparse, masked and
            any module computing ``gwc(x) + pwc(x)`` as the published code does.
        input_size (sequence of int): ``(batch, channels, *spatial)``; counts are for the whole
            batch, so use a batch of 1 for per-image numbers.
        norm (bool): count BatchNorm as one MAC per output element (default, the paper's
            totals); False counts convolutions and linear layers only.

    Returns:
        ModelCounts: one row per module that has a handler or holds parameters, with totals;
        ``str()`` gives the per-layer table.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``input_size`` holds a non-int (or is a
            tensor), ``norm`` is not a bool.
        ValueError: a malformed ``input_size``, or one the model cannot take (the message names
            the size and the module whose forward failed).

    Warns:
        UserWarning: modules holding parameters without a MAC handler (e.g. ``nn.LayerNorm``);
        their parameters are counted, their MACs are not.

    Example:
        >>> counts = count_model(vgg16_cifar(part=4, form="masked"), (1, 3, 32, 32))
        >>> counts.useful_macs < counts.executed_macs
        True
    """
    check_model(model)
    size = _check_input_size(input_size)
    if not isinstance(norm, bool):
        raise TypeError(f"norm must be a bool, got {type(norm).__name__}")
    rows: dict[str, LayerCount] = {}
    hooks, handled, skip = [], {}, []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if any(prefix == "" or name.startswith(prefix + ".") for prefix in skip):
            continue
        hetconv = _hetconv_pattern(module, name)
        handler = _handler(module, norm, hetconv)
        if handler is not None:
            useful, stored = _own_params(module, seen, hetconv)
            rows[name] = LayerCount(name, type(module).__name__, params=useful, stored_params=stored)
            handled[name] = handler
            skip.append(name)
        elif any(True for _ in module.parameters(recurse=False)):
            stored = sum(p.numel() for p in module.parameters(recurse=False) if id(p) not in seen)
            seen.update(id(p) for p in module.parameters(recurse=False))
            rows[name] = LayerCount(name, type(module).__name__, params=stored, stored_params=stored,
                                    counted=False)
    uncounted = [f"'{r.name or '<model>'}' ({r.kind})" for r in rows.values() if not r.counted]
    if uncounted:
        warnings.warn(f"count_model: no MAC handler for {', '.join(uncounted[:5])}"
                      f"{' and others' if len(uncounted) > 5 else ''}; their parameters are counted, "
                      "their MACs are not", stacklevel=2)

    def hook(name):
        def record(module, args, output):
            useful, executed, *backend = handled[name](module, args[0] if args else None, output)
            row = rows[name]
            row.backend = backend[0] if backend else ""
            row.useful_macs += int(useful)
            row.executed_macs += int(executed)
            row.output_shape = tuple(output.shape)
        return record

    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.get_default_dtype()
    modes = {module: module.training for module in model.modules()}
    try:
        for name, module in model.named_modules():
            if name in handled:
                hooks.append(module.register_forward_hook(hook(name)))
        model.eval()
        with torch.no_grad():
            _run_located(model, torch.zeros(size, device=device, dtype=dtype), size)
    finally:
        for handle in hooks:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return ModelCounts(size, list(rows.values()))


def count_macs(model: nn.Module, input_size: Sequence[int], executed: bool = False, norm: bool = True) -> int:
    """Multiply-accumulates of one forward pass, the paper's way (see the module notes).

    Args:
        model (nn.Module): the model.
        input_size (sequence of int): ``(batch, channels, *spatial)``, e.g. ``(1, 3, 32, 32)``.
        executed (bool): False (default): useful MACs — HetConv layers count their existing
            kernels only, so the sparse, masked and published forms count the same. True: what the
            model's present form really computes (the masked zeros included).
        norm (bool): count BatchNorm as one MAC per output element (default, as the paper's
            totals do); False: convolutions and linear layers only.

    Returns:
        int: MACs for the whole batch.

    Raises:
        TypeError / ValueError: see :func:`count_model`.

    Example:
        >>> count_macs(vgg16_cifar(part=4), (1, 3, 32, 32))  # the paper: 105.98 M
        106122752
    """
    if not isinstance(executed, bool):
        raise TypeError(f"executed must be a bool, got {type(executed).__name__}")
    counts = count_model(model, input_size, norm)
    return counts.executed_macs if executed else counts.useful_macs


def count_params(model: nn.Module, stored: bool = False) -> int:
    """Parameters of a model, the paper's way: each HetConv layer counts its pattern's kernels.

    The masked form's zeroed 1 x 1 weights are left out, and a module in the published layout
    (``gwc`` + ``pwc``, recognised by what it computes, see the module notes) counts what
    :func:`to_sparse` makes of it.

    Args:
        model (nn.Module): the model; shared parameters count once.
        stored (bool): True counts every stored element instead (``sum(p.numel())``).

    Returns:
        int: the count; a model gives the same number in every form that computes the same function.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``stored`` not a bool.
    """
    check_model(model)
    if not isinstance(stored, bool):
        raise TypeError(f"stored must be a bool, got {type(stored).__name__}")
    total = sum(p.numel() for p in model.parameters())
    if stored:
        return total
    seen: set[int] = set()
    for _, unit, hetconv in _hetconv_units(model):
        useful, unit_stored = _own_params(unit, seen, hetconv)
        total += useful - unit_stored
    return total
