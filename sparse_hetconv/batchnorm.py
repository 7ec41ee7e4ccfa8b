"""Fold BatchNorm into the HetConv (or standard) layer before it, for inference.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. In eval mode a BatchNorm is
an affine map per channel, ``y = s (z - mean) + beta`` with ``s = gamma / sqrt(var + eps)``. When
``z`` is a HetConv's output, scaling filter ``j``'s k x k kernels *and* its 1 x 1 kernels by
``s[j]`` and setting the bias to ``s (bias - mean) + beta`` gives the same ``y`` in one layer: the
pass over the activations that the BatchNorm costs disappears. Both parts are scaled, so the
folded layer is still a HetConv of the same pattern (the masked form's zero block diagonal stays
zero). The same folding is applied to standard convolutions and to ``Linear`` + ``BatchNorm1d``.

A pair can be folded only when the BatchNorm is the *only* user of the layer's output (a
residual branch that also reads the convolution's output would otherwise see the BatchNorm's
result). :func:`fuse_bn` finds such pairs in the model's data flow, traced with ``torch.fx``;
where a module cannot be traced, in its module tree (neighbours in an ``nn.Sequential``, and the
``conv_bn_pairs`` a module declares, as the registered ResNets do).
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._base import _HetConvBase
from ._checks import check_bool, check_model
from ._probe import hook_names, no_global_hooks, silenced
from .convert import ConversionReport
from .masked import _MaskedHetConvNd
from .sparse import _SparseHetConvNd

__all__ = ["FuseReport", "fuse_bn"]

_BN_FOR = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_STANDARD = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _scale_shift(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` in float64 with ``bn(z) = s z + t`` in eval mode."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def _conv_dims(module: nn.Module) -> int | None:
    """Spatial dimensions of a foldable layer (None if ``module`` is not one)."""
    if isinstance(module, (_SparseHetConvNd, _MaskedHetConvNd)):
        return module._dims
    if type(module) in _STANDARD:
        return module.weight.dim() - 2
    if type(module) is nn.Linear:
        return 0
    return None


def _misfit(module: nn.Module, bn: nn.Module) -> str | None:
    """Why ``bn`` cannot be folded into the foldable layer ``module`` (None if it can)."""
    dims = _conv_dims(module)
    expected = _BN_FOR[dims]
    channels = module.out_features if dims == 0 else module.out_channels
    if type(bn) is not expected:
        return f"a {type(bn).__name__} after a {type(module).__name__} (expected {expected.__name__})"
    if bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (track_running_stats=False): it normalises with each batch's own"
    if bn.num_features != channels:
        return f"it has {bn.num_features} features but the {type(module).__name__} has {channels} outputs"
    return None


def _scaled(param: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (param.dim() - 1)
    return (param.double() * scale.view(shape)).to(param.dtype)


def _new_bias(old: torch.Tensor | None, scale, shift, like: torch.Tensor) -> nn.Parameter:
    base = old.double() if old is not None else torch.zeros_like(shift)
    return nn.Parameter((base * scale + shift).to(device=like.device, dtype=like.dtype))


def _fold(module: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` into ``module`` in place: every weight scaled per filter, one new bias."""
    with torch.no_grad():
        _fold_weights(module, *_scale_shift(bn))


def _fold_weights(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    if isinstance(module, _SparseHetConvNd):
        weights, owner, bias = (module.weight_kxk, module.weight_1x1), module, module.bias
    elif isinstance(module, _MaskedHetConvNd):
        weights, owner, bias = (module.gwc.weight, module.pwc.weight), module.gwc, module.gwc.bias
        if module.pwc.bias is not None:  # a published-style pair with two biases: sum them
            bias = module.pwc.bias if bias is None else bias + module.pwc.bias
            module.pwc.bias = None
    else:  # nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear
        weights, owner, bias = (module.weight,), module, module.bias
    scale, shift = scale.to(weights[0].device), shift.to(weights[0].device)
    for weight in weights:
        if weight is not None:
            weight.copy_(_scaled(weight, scale))
    owner.bias = _new_bias(bias, scale, shift, weights[0])


@dataclass
class FuseReport(ConversionReport):
    """What :func:`fuse_bn` did (``return_report=True``), in the shape of the converters' report.

    Attributes:
        converter (str): ``"fuse_bn"``.
        replaced (list of str): paths of the BatchNorm modules folded and replaced by
            ``nn.Identity``, in module order.
        skipped (dict): path of every BatchNorm left as it is -> why.
        folded_into (dict): BatchNorm path -> path of the layer it was folded into.
        untraced (dict): path of a module ``torch.fx`` could not trace -> why (its module tree was
            searched instead).
        params_before (int), params_after (int): stored parameter elements before and after.
    """

    folded_into: dict[str, str] = field(default_factory=dict)
    untraced: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.converter}: folded {len(self.replaced)} BatchNorm layers, left {len(self.skipped)}; "
                 f"parameters {self.params_before:,} -> {self.params_after:,} ({self.reduction:.1%})"]
        lines += [f"  folded {name} into {self.folded_into[name] or '<root>'}" for name in self.replaced]
        lines += [f"  left   {name or '<root>'}: {why}" for name, why in self.skipped.items()]
        lines += [f"  not traced {name or '<root>'}: {why}" for name, why in self.untraced.items()]
        return "\n".join(lines)


def fuse_bn(model: nn.Module, inplace: bool = False, return_report: bool = False):
    """Fold every BatchNorm that is the only user of a convolution's output into it, for inference.

    Foldable layers: :class:`SparseHetConv2d` / ``3d`` and :class:`MaskedHetConv2d` / ``3d``
    (both parts scaled, the bias created if needed), ``nn.Conv1d`` / ``2d`` / ``3d`` (any groups)
    with the BatchNorm of their dimension, and ``nn.Linear`` with ``BatchNorm1d`` (over a
    ``(batch, features)`` output). A pair is folded when the BatchNorm's only input is the
    layer's output and nothing else reads that output, each called once, and the layer has no
    forward or backward hook and no parameter read elsewhere (tied to another module, or read
    directly in a forward, e.g. ``F.conv2d(y, self.conv.weight)``). Pairs are found in the
    data flow of ``torch.fx``'s trace of the model (HetConv layers, convolutions and BatchNorms
    are leaves; user hooks are silenced while tracing); a module fx cannot trace (data-dependent
    control flow, say) is searched in its module tree instead: neighbours in an
    ``nn.Sequential``, and the pairs of children it declares in a ``conv_bn_pairs`` attribute
    (``(("conv1", "bn1"), ...)``; the registered ResNet blocks do), then each child the same
    way. So every BatchNorm of :func:`sparse_hetconv.models.resnet18` (20) and of
    ``vgg16_cifar`` (14) is folded.

    Each folded BatchNorm is replaced by ``nn.Identity`` in eval mode (module names and indices
    are kept; hooks on it are dropped). The result computes what the model computed in eval mode,
    up to rounding (the arithmetic is done in float64); BatchNorm statistics are gone, so it is
    for inference only: training it again would not update them. Fusing a fused model changes
    nothing. A BatchNorm that cannot be folded is left as it is, with the reason in the report
    and a warning.

    Args:
        model (nn.Module): the model, in eval mode.
        inplace (bool): change ``model`` itself instead of a deep copy.
        return_report (bool): also return a :class:`FuseReport` (what was folded into what, what
            was left and why).

    Returns:
        nn.Module: the fused model (in eval mode); with ``return_report``, ``(model, report)``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``inplace`` or ``return_report`` not a bool.
        ValueError: ``model`` is in training mode (folding uses the running statistics, which is
            only what the model computes in eval mode).

    Example:
        >>> model = vgg16_cifar(part=4).eval()
        >>> fused, report = fuse_bn(model, return_report=True)
        >>> len(report.replaced), sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
        (14, 0)
    """
    check_model(model)
    check_bool("inplace", inplace)
    check_bool("return_report", return_report)
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f"fuse_bn folds BatchNorm running statistics, which is what the model computes in "
                         f"eval mode, but {len(training)} module(s) are in training mode (first: "
                         f"'{training[0]}'); call model.eval() first")
    report = FuseReport("fuse_bn", params_before=_params(model))
    if not inplace:
        model = copy.deepcopy(model)
    search = _Search(model)
    search.run(model, "")
    pairs, report.skipped, report.untraced = search.results()  # nothing has been changed so far
    for bn_path, layer_path in pairs:
        bn = model.get_submodule(bn_path)
        _fold(model.get_submodule(layer_path), bn)
        parent_path, _, name = bn_path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, nn.Identity().train(bn.training))
        report.replaced.append(bn_path)
        report.folded_into[bn_path] = layer_path
    report.params_after = _params(model)
    if report.skipped:
        first, why = next(iter(report.skipped.items()))
        warnings.warn(f"fuse_bn: folded {len(report.replaced)} of {len(report.replaced) + len(report.skipped)} "
                      f"BatchNorm layers; left {len(report.skipped)} as they are (first: '{first or '<root>'}': "
                      f"{why}); return_report=True lists them all", stacklevel=2)
    return (model, report) if return_report else model


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _Tracer(fx.Tracer):
    """fx's tracer with every layer fuse_bn reads as a leaf: their ``forward`` (input checks,
    backend choice) is not traced, only where their outputs go."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        # (by type: _conv_dims reads module.weight, which fx would record as a get_attr node)
        return (isinstance(module, (_BatchNorm, _HetConvBase)) or type(module) in _STANDARD + (nn.Linear,)
                or super().is_leaf_module(module, qualified_name))


def _reads_shape(node: fx.Node) -> bool:
    """``t.dim()``, ``t.size(...)``, ``t.shape``: a use that folding does not change."""
    return ((node.op == "call_method" and node.target in ("dim", "size"))
            or (node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


class _Search:
    """Finds ``(BatchNorm path, layer path)`` pairs, and why every other BatchNorm is left.

    Changes nothing: :func:`fuse_bn` applies the pairs once the whole model is searched.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.batchnorms = [path for path, m in model.named_modules() if isinstance(m, _BatchNorm)]
        self.names: dict[int, list[str]] = defaultdict(list)
        self.owners: dict[int, set[int]] = defaultdict(set)
        for path, module in model.named_modules(remove_duplicate=False):
            self.names[id(module)].append(path or "<root>")
            for param in module.parameters(recurse=False):
                self.owners[id(param)].add(id(module))
        self.read: set[int] = set()  # ids of the tensors a traced forward reads itself (get_attr)
        self.candidates: dict[str, str] = {}  # BatchNorm path -> layer path
        self.reasons: dict[str, str] = {}  # BatchNorm path -> why it is left
        self.untraced: dict[str, str] = {}

    def run(self, module: nn.Module, prefix: str) -> None:
        """Search ``module`` (at ``prefix``): its traced graph, else its module tree and children."""
        if _conv_dims(module) is not None or isinstance(module, (_BatchNorm, _HetConvBase)):
            return  # a layer or a BatchNorm: whether it is folded is up to the module that calls it
        if not any(isinstance(m, _BatchNorm) for m in module.modules()):
            return
        try:
            with no_global_hooks(), silenced(module):  # no user hook may run on fx's proxies
                graph = _Tracer().trace(module)
        except Exception as error:  # tracing runs the model's own forward: any failure means "not traceable"
            lines = str(error).strip().splitlines()
            self.untraced[prefix] = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
            self._from_tree(module, prefix)
            for name, child in module.named_children():
                self.run(child, _join(prefix, name))
            return
        self._from_graph(module, graph, prefix)

    def _from_graph(self, module: nn.Module, graph: fx.Graph, prefix: str) -> None:
        for node in graph.nodes:
            if node.op == "get_attr" and not all(_reads_shape(user) for user in node.users):
                # e.g. F.conv2d(y, self.conv.weight): it sees the weight as stored (w.dim() would not change)
                try:
                    self.read.add(id(operator.attrgetter(node.target)(module)))
                except AttributeError:
                    pass
        nodes = [node for node in graph.nodes if node.op == "call_module"]
        calls = Counter(id(module.get_submodule(node.target)) for node in nodes)
        for node in nodes:
            target, path = module.get_submodule(node.target), _join(prefix, node.target)
            if not isinstance(target, _BatchNorm):
                if _conv_dims(target) is None and any(isinstance(m, _BatchNorm) for m in target.modules()):
                    self.run(target, path)  # a leaf fx does not trace into (a torch.nn container)
                continue
            source = node.args[0] if node.args else None
            layer = module.get_submodule(source.target) if (
                isinstance(source, fx.Node) and source.op == "call_module") else None
            if len(node.args) != 1 or node.kwargs:
                self._reason(path, "it is called with more than its input")
            elif layer is None or _conv_dims(layer) is None:
                self._reason(path, f"its input is {self._describe(module, source, prefix)}, not a convolution "
                                   "or linear layer to fold it into")
            elif len(source.users) > 1:
                other = next(user for user in source.users if user is not node)
                self._reason(path, f"the output of '{_join(prefix, source.target)}' is also used by "
                                   f"{self._describe(module, other, prefix)}, which must not see the "
                                   "BatchNorm's scaling")
            elif calls[id(target)] > 1 or calls[id(layer)] > 1:
                self._reason(path, f"it or '{_join(prefix, source.target)}' is called more than once in forward")
            else:
                self._candidate(path, _join(prefix, source.target))

    def _from_tree(self, module: nn.Module, prefix: str) -> None:
        """Pairs of ``module``'s children that need no trace: neighbours in a plain
        ``nn.Sequential`` (it feeds each child's output to the next only) and the declared ones."""
        children = dict(module.named_children())
        pairs = []
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            names = list(children)
            pairs += list(zip(names, names[1:]))
        declared = getattr(module, "conv_bn_pairs", ())
        if isinstance(declared, (tuple, list)):
            pairs += [tuple(pair) for pair in declared if isinstance(pair, (tuple, list)) and len(pair) == 2]
        for layer_name, bn_name in pairs:
            layer, bn = children.get(layer_name), children.get(bn_name)
            if isinstance(bn, _BatchNorm) and layer is not None and _conv_dims(layer) is not None:
                self._candidate(_join(prefix, bn_name), _join(prefix, layer_name))

    def _reason(self, bn_path: str, why: str) -> None:
        if bn_path not in self.candidates:
            self.reasons.setdefault(bn_path, why)

    def _candidate(self, bn_path: str, layer_path: str) -> None:
        if bn_path in self.candidates:
            return
        layer, bn = self.model.get_submodule(layer_path), self.model.get_submodule(bn_path)
        why = _misfit(layer, bn)
        for path, module in ((layer_path, layer), (bn_path, bn)):
            if why is None and len(self.names[id(module)]) > 1:
                why = f"'{path}' is registered under several names ({', '.join(self.names[id(module)])})"
        if why is None and any(len(self.owners[id(p)]) > 1 for p in layer.parameters()):
            why = f"'{layer_path}' shares its parameters with another module, which would change too"
        hooks = [kind for kind in hook_names(layer, state=False) if kind != "forward pre-hook"]
        if why is None and hooks:
            why = (f"'{layer_path}' has a {hooks[0]}, which would see (or be given the gradient of) the "
                   "BatchNorm's output instead of its own")
        if why is None and layer_path in self.candidates.values():
            why = f"'{layer_path}' is already folded with another BatchNorm"
        if why is not None:
            self.reasons[bn_path] = why
            return
        self.reasons.pop(bn_path, None)
        self.candidates[bn_path] = layer_path

    @staticmethod
    def _describe(module: nn.Module, node: object, prefix: str) -> str:
        if not isinstance(node, fx.Node):
            return repr(node)
        if node.op == "call_module":
            return f"'{_join(prefix, node.target)}' ({type(module.get_submodule(node.target)).__name__})"
        if node.op == "placeholder":
            return f"the input of '{prefix or '<root>'}'"
        if node.op == "call_function":
            return f"{getattr(node.target, '__name__', node.target)}(...)"
        if node.op == "call_method":
            return f"a .{node.target}() call"
        return f"'{node.target}' ({node.op})"

    def results(self) -> tuple[list[tuple[str, str]], dict[str, str], dict[str, str]]:
        """``(pairs, skipped, untraced)``: the pairs in module order, and every other BatchNorm's reason."""
        for bn_path, layer_path in list(self.candidates.items()):
            for path in (layer_path, bn_path):
                module = self.model.get_submodule(path)
                name = next((n for n, t in list(module.named_parameters()) + list(module.named_buffers())
                             if id(t) in self.read), None)
                if name is not None:
                    del self.candidates[bn_path]
                    self.reasons[bn_path] = (f"'{_join(path, name)}' is also read directly in a forward (a get_attr), "
                                             "which must see it as it is")
                    break
        pairs = [(path, self.candidates[path]) for path in self.batchnorms if path in self.candidates]
        skipped = {path: self.reasons.get(path, "it is neither called in a traced forward nor paired with a "
                                                "layer in an nn.Sequential or a conv_bn_pairs declaration")
                   for path in self.batchnorms if path not in self.candidates}
        return pairs, skipped, dict(self.untraced)
