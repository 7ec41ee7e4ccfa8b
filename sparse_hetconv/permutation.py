"""Channel permutations through a network: the module that applies one, and the pass that removes them.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. A layer in the paper's
shifted pattern is a block-pattern layer between two channel permutations (docs/design.md §2).
:class:`ChannelPermutation` applies one explicitly; :func:`absorb_permutations` moves them
through the per-channel layers of a model (BatchNorm, elementwise activations, pooling, dropout,
depthwise convolutions, flatten) and folds them into the weights of a neighbouring standard
convolution or ``nn.Linear``, or cancels two of them against each other, so that in a chain of
layers nothing is permuted at run time (docs/design.md §8). A permutation that cannot be moved
safely stays where it is, as an explicit :class:`ChannelPermutation`.

The data flow comes from ``torch.fx`` where the model traces (modules that do not trace are
treated as opaque), and from the order of each ``nn.Sequential``'s children otherwise (which
assumes, as ``nn.Sequential.forward`` does, that the children run one after another on one
tensor and that nothing else reads the tensors between them).
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ._base import _HetConvBase
from ._probe import hook_names, no_global_hooks, silenced

__all__ = ["ChannelPermutation", "absorb_permutations", "between_permutations", "permutation_finisher"]


class ChannelPermutation(nn.Module):
    """Reorder the channels (dim 1) of a tensor: ``output = input[:, perm]``.

    The explicit form of the channel permutations that relate the paper's shifted HetConv pattern
    to this library's block pattern (docs/design.md §2); the converters leave one only where no
    neighbouring layer can absorb it, and their report lists where.

    Args:
        perm (sequence of int or Tensor[C]): a permutation of ``range(C)``; output channel ``i`` is
            input channel ``perm[i]``. Stored as the int64 buffer ``perm`` (so ``.to(device)``
            moves it and the ``state_dict`` describes the model completely).

    Shape:
        input (Tensor[batch, C, *]) -> Tensor[batch, C, *]

    Raises:
        ValueError: ``perm`` is not a permutation of ``range(len(perm))``; at call time, an
            input with another number of channels.

    Example:
        >>> p = ChannelPermutation([2, 0, 1])
        >>> p(torch.tensor([[10., 11., 12.]]))
        tensor([[12., 10., 11.]])
        >>> p.inverse().perm
        tensor([1, 2, 0])
    """

    def __init__(self, perm) -> None:
        super().__init__()
        perm = torch.as_tensor(perm)
        if perm.dim() != 1 or perm.dtype in (torch.bool,) or perm.dtype.is_floating_point or perm.dtype.is_complex \
                or not torch.equal(torch.sort(perm.long().cpu()).values, torch.arange(perm.numel())):
            shown = perm.tolist() if perm.numel() <= 8 else f"a tensor of shape {tuple(perm.shape)}"
            raise ValueError(f"perm ({shown}) must be a permutation of range(C): a 1-D sequence of the ints "
                             "0 .. C-1, each once")
        self.register_buffer("perm", perm.long().clone())

    @property
    def channels(self) -> int:
        """``C``, the number of channels permuted."""
        return self.perm.numel()

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(f"ChannelPermutation expects a torch.Tensor, got {type(input).__name__}")
        if input.dim() < 2 or input.shape[1] != self.channels:
            raise ValueError(f"ChannelPermutation expects an input with {self.channels} channels (dim 1), got "
                             f"shape {tuple(input.shape)}")
        return input.index_select(1, self.perm)

    def inverse(self) -> "ChannelPermutation":
        """The permutation that undoes this one."""
        return ChannelPermutation(torch.argsort(self.perm))

    def is_identity(self) -> bool:
        return bool(torch.equal(self.perm, torch.arange(self.channels, device=self.perm.device)))

    def extra_repr(self) -> str:
        shown = self.perm.tolist()
        return f"{self.channels}, perm={shown if len(shown) <= 8 else str(shown[:8])[:-1] + ', ...]'}"


# -- what a permutation may pass through ---------------------------------------------------------
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
                nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink,
                nn.Softshrink, nn.Hardshrink, nn.LogSigmoid, nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d,
                nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_SPATIAL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
            nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
            nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
            nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.Upsample)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu,
              F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh,
              F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
              F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
              F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
              operator.mul, operator.truediv, operator.add, operator.sub, operator.neg, torch.mul, torch.add}
_POOLS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
          F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
          F.adaptive_max_pool3d}
_ARITHMETIC = {operator.mul, operator.truediv, operator.add, operator.sub, torch.mul, torch.add}
# max pools and the position of their ``return_indices`` argument
_MAX_POOLS = {F.max_pool1d: 6, F.max_pool2d: 6, F.max_pool3d: 6, F.adaptive_max_pool1d: 2, F.adaptive_max_pool2d: 2,
              F.adaptive_max_pool3d: 2}
_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "mul", "div", "add",
            "sub", "neg", "mul_", "div_", "add_", "sub_"}


def _returns_indices(module_or_node) -> bool:
    return bool(getattr(module_or_node, "return_indices", False))


def _channel_params(module: nn.Module) -> list[str]:
    """Names of ``module``'s tensors indexed by channel on dim 0 (permuted with the channels)."""
    if isinstance(module, _NORMS):
        return [n for n in ("weight", "bias", "running_mean", "running_var") if getattr(module, n, None) is not None]
    if isinstance(module, nn.PReLU):
        return ["weight"] if module.num_parameters > 1 else []
    if type(module) in _CONVS:  # depthwise: one filter per channel
        return [n for n in ("weight", "bias") if getattr(module, n, None) is not None]
    return []


def _classify_module(module: nn.Module, protected: set[int]) -> str:
    if isinstance(module, ChannelPermutation):
        return "perm"
    if id(module) in protected or hook_names(module, state=False):
        return "barrier"  # a hook would see the channels in another order
    if isinstance(module, _NORMS) or isinstance(module, nn.PReLU):
        return "channel"
    if isinstance(module, _ELEMENTWISE):
        return "fn"
    if isinstance(module, _SPATIAL) and not _returns_indices(module):
        return "spatial"  # per channel over dims 2...; after a flatten it would mix features
    if isinstance(module, nn.Flatten):
        return "flatten" if module.start_dim == 1 and module.end_dim == -1 else "barrier"
    if type(module) in _CONVS and module.groups == 1:
        return "free"
    if type(module) in _CONVS and module.groups == module.in_channels == module.out_channels:
        return "channel"
    if type(module) is nn.Linear:
        return "free"
    return "barrier"


@dataclass(eq=False)
class _Node:
    kind: str  # perm | channel | fn | spatial | flatten | free | barrier
    path: str | None = None
    inputs: list["_Node"] = field(default_factory=list)
    users: list["_Node"] = field(default_factory=list)


# -- the data flow: torch.fx, or nn.Sequential chains ----------------------------------------------
class _Tracer(fx.Tracer):
    def __init__(self, opaque: set[str]) -> None:
        super().__init__()
        self.opaque, self.failed = opaque, None

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return (isinstance(m, (_HetConvBase, ChannelPermutation)) or qualified_name in self.opaque
                or super().is_leaf_module(m, qualified_name))

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:
                self.failed = self.path_of_module(m)
            raise


def _trace(model: nn.Module, attempts: int = 64) -> fx.Graph | None:
    """The model's graph, with every module that does not trace treated as opaque; None if the
    model's own forward does not trace."""
    # A module with hooks is a leaf (a stop point, docs/design.md §8): a permutation moved through it
    # would reorder what its hooks see. (Tracing silences the hooks, so they are read first.)
    opaque = {name for name, module in model.named_modules() if name and hook_names(module, state=False)}
    for _ in range(attempts):
        tracer = _Tracer(opaque)
        try:
            with no_global_hooks(), silenced(model):
                return tracer.trace(model)
        except Exception:
            if not tracer.failed or tracer.failed in opaque:
                return None
            opaque.add(tracer.failed)
    return None


def _is_meta(node: fx.Node) -> bool:
    """Nodes that read a tensor's shape only (``x.size(0)``, ``x.shape[0]``): not data users."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
        return True
    return node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
        and _is_meta(node.args[0])


def _only_tensor_arg(node: fx.Node) -> bool:
    data = [a for a in node.all_input_nodes if not _is_meta(a)]
    return len(data) == 1 and node.args and node.args[0] is data[0]


def _classify_fx(node: fx.Node, model: nn.Module, calls: dict, protected: set[int]) -> tuple[str, str | None]:
    if node.op == "call_module":
        module = model.get_submodule(node.target)
        kind = _classify_module(module, protected)
        if kind in ("channel", "free", "perm") and calls[node.target] > 1:
            kind = "barrier"  # used at several places: its weights cannot follow one of them
        return kind, node.target
    if node.op == "call_function" and node.target in _FUNCTIONS:
        others = list(node.args[1:]) + list(node.kwargs.values())
        if not _only_tensor_arg(node) or any(isinstance(a, fx.Node) for a in others):
            return "barrier", None
        if node.target in _ARITHMETIC and not (len(node.args) == 2 and isinstance(node.args[1], (int, float))):
            return "barrier", None  # only ``x * number``: a tensor operand may differ per channel
        position = _MAX_POOLS.get(node.target)
        if position is not None and (node.kwargs.get("return_indices") or
                                     (len(node.args) > position and node.args[position])):
            return "barrier", None  # it returns (values, indices)
        return ("spatial" if node.target in _POOLS else "fn"), None
    if node.op == "call_function" and node.target is torch.flatten and _only_tensor_arg(node):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return ("flatten" if (start, end) == (1, -1) else "barrier"), None
    if node.op == "call_method" and node.target in _METHODS and _only_tensor_arg(node) and not node.kwargs:
        if node.target.rstrip("_") in ("mul", "div", "add", "sub"):
            if not (len(node.args) == 2 and isinstance(node.args[1], (int, float))):
                return "barrier", None
        elif len(node.args) != 1:
            return "barrier", None
        return "fn", None
    if node.op == "call_method" and node.target == "flatten" and _only_tensor_arg(node):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return ("flatten" if (start, end) == (1, -1) else "barrier"), None
    if node.op == "call_method" and node.target in ("view", "reshape") and len(node.args) == 3 and not node.kwargs:
        first, size, rest = node.args
        if isinstance(size, fx.Node) and _is_meta(size) and rest == -1 and _only_tensor_arg(node):
            return "flatten", None  # x.view(x.size(0), -1)
    return "barrier", None


def _shared_tensor_owners(model: nn.Module) -> set[int]:
    """Ids of the modules holding a parameter or buffer that another module also holds (a tied
    weight): permuting it in place for one of them would change the other (a barrier)."""
    owners: dict[int, set[int]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            owners.setdefault(id(tensor), set()).add(id(module))
    return {module for held in owners.values() if len(held) > 1 for module in held}


def _read_directly(model: nn.Module, graph: fx.Graph) -> set[int]:
    """Ids of the modules holding a tensor that the graph reads with a ``get_attr`` node (e.g.
    ``F.conv2d(y, self.post.weight)`` in a forward): that read would see it permuted (a barrier)."""
    read = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            try:
                read.add(id(operator.attrgetter(node.target)(model)))
            except AttributeError:
                continue
    return {id(module) for _, module in model.named_modules(remove_duplicate=False)
            if any(id(t) in read for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)))}


def _fx_nodes(model: nn.Module, protected: set[int]) -> list[_Node] | None:
    graph = _trace(model)
    if graph is None:
        return None
    protected = protected | _read_directly(model, graph)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    ours: dict[fx.Node, _Node] = {}
    for node in graph.nodes:
        if _is_meta(node):
            continue
        kind, path = _classify_fx(node, model, calls, protected) if node.op not in ("placeholder", "output",
                                                                                 "get_attr") else ("barrier", None)
        item = ours[node] = _Node(kind, path)
        for parent in node.all_input_nodes:
            if parent in ours:
                item.inputs.append(ours[parent])
                ours[parent].users.append(item)
    return list(ours.values())


def _sequential_nodes(model: nn.Module, protected: set[int]) -> list[_Node]:
    """One chain per outermost ``nn.Sequential`` (nested ones inlined), ends opaque."""
    counts: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        counts[id(module)] = counts.get(id(module), 0) + 1
    nodes: list[_Node] = []
    inlined: set[int] = set()

    def flatten(prefix: str, sequential: nn.Sequential):
        for name, child in sequential.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if type(child) is nn.Sequential and counts[id(child)] == 1 and not hook_names(child, state=False):
                inlined.add(id(child))
                yield from flatten(path, child)
            else:
                yield path, child

    for path, module in model.named_modules():
        if type(module) is not nn.Sequential or id(module) in inlined:
            continue
        previous = _Node("barrier")
        nodes.append(previous)
        for child_path, child in flatten(path, module):
            kind = _classify_module(child, protected)
            if kind in ("channel", "free", "perm") and counts[id(child)] > 1:
                kind = "barrier"
            node = _Node(kind, child_path, [previous])
            previous.users.append(node)
            nodes.append(node)
            previous = node
        end = _Node("barrier", None, [previous])
        previous.users.append(end)
        nodes.append(end)
    return nodes


# -- moving one permutation ----------------------------------------------------------------------
def _inverse(perm: Tensor) -> Tensor:
    return torch.argsort(perm)


def _expand(perm: Tensor, spatial: int) -> Tensor:
    """The permutation of ``flatten(x, 1)``'s features for a channel permutation of ``x``."""
    offsets = torch.arange(spatial, device=perm.device)
    return (perm[:, None] * spatial + offsets[None, :]).reshape(-1)


class _Absorber:
    def __init__(self, model: nn.Module, nodes: list[_Node]) -> None:
        self.model, self.nodes = model, nodes
        self.perms = {id(n): self.model.get_submodule(n.path).perm.detach().cpu() for n in nodes if n.kind == "perm"}

    def module(self, node: _Node) -> nn.Module:
        return self.model.get_submodule(node.path)

    # Each mover returns the actions that move the permutation away, or None if it cannot move.
    # Actions: ("index", path, tensor names, dim, index) sets t = t.index_select(dim, index);
    # ("perm", node, perm) sets a permutation node's permutation (an identity one is dropped).
    def forward(self, start: _Node, perm: Tensor):
        actions, node, spatial, flat = [], start, None, False
        channels = perm.numel()
        while True:
            if len(node.users) != 1:
                return None
            user = node.users[0]
            if len(user.inputs) != 1:
                return None
            if user.kind == "perm" and not flat:
                return actions + [("perm", start, torch.arange(channels)), ("perm", user, perm[self.perms[id(user)]])]
            if user.kind == "fn" or (user.kind == "spatial" and not flat):
                node = user  # (a pool after a flatten pools across features: channels mix)
                continue
            if user.kind == "flatten" and not flat:
                node, flat = user, True
                continue
            if user.kind not in ("channel", "free"):
                return None
            module = self.module(user)
            if flat:
                features = module.in_features if isinstance(module, nn.Linear) else getattr(module, "num_features", 0)
                if isinstance(module, nn.Linear) or isinstance(module, nn.BatchNorm1d):
                    if features % channels:
                        return None
                    spatial = features // channels if spatial is None else spatial
                    if features != channels * spatial:
                        return None
                else:
                    return None
            current = _expand(perm, spatial) if flat else perm
            if user.kind == "channel":
                names = _channel_params(module)
                if any(getattr(module, n).shape[0] != current.numel() for n in names):
                    return None
                actions.append(("index", user.path, names, 0, _inverse(current)))
                node = user
                continue
            size = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            if isinstance(module, nn.Linear) != flat or size != current.numel():
                return None
            return actions + [("index", user.path, ["weight"], 1, _inverse(current)),
                              ("perm", start, torch.arange(channels))]

    def backward(self, start: _Node, perm: Tensor):
        actions, node = [], start
        while True:
            if len(node.inputs) != 1:
                return None
            producer = node.inputs[0]
            if len(producer.users) != 1:
                return None
            if producer.kind == "perm":
                return actions + [("perm", start, torch.arange(perm.numel())),
                                  ("perm", producer, self.perms[id(producer)][perm])]
            if producer.kind in ("fn", "spatial"):
                node = producer
                continue
            if producer.kind not in ("channel", "free"):
                return None
            module = self.module(producer)
            if producer.kind == "channel":
                names = _channel_params(module)
                if any(getattr(module, n).shape[0] != perm.numel() for n in names):
                    return None
                actions.append(("index", producer.path, names, 0, perm))
                node = producer
                continue
            if isinstance(module, nn.Linear) or module.out_channels != perm.numel():
                return None
            names = [n for n in ("weight", "bias") if getattr(module, n, None) is not None]
            return actions + [("index", producer.path, names, 0, perm), ("perm", start, torch.arange(perm.numel()))]

    def apply(self, actions) -> None:
        with torch.no_grad():
            for action in actions:
                if action[0] == "perm":
                    _, node, perm = action
                    self.perms[id(node)] = perm
                    if torch.equal(perm, torch.arange(perm.numel())):
                        node.kind = "fn"  # dropped: from now on it passes everything through
                    continue
                _, path, names, dim, index = action
                module = self.model.get_submodule(path)
                for name in names:
                    tensor = getattr(module, name)
                    tensor.copy_(tensor.index_select(dim, index.to(tensor.device)))

    def run(self) -> None:
        for node in self.nodes:
            if node.kind != "perm":
                continue
            perm = self.perms[id(node)]
            if torch.equal(perm, torch.arange(perm.numel())):
                self.apply([("perm", node, perm)])
                continue
            actions = self.forward(node, perm)
            if actions is None:
                actions = self.backward(node, perm)
            if actions is not None:
                self.apply(actions)


def absorb_permutations(model: nn.Module, protected=()) -> tuple[list[str], list[str]]:
    """Move every :class:`ChannelPermutation` in ``model`` into its neighbours, in place (§8).

    A permutation moves forward (then, failing that, backward) through per-channel layers, whose
    per-channel tensors are permuted with it, until a standard convolution (``groups=1``) or an
    ``nn.Linear`` after a flatten absorbs it into its weights, or it meets another permutation
    and the two are composed (two inverse ones cancel). It stops, and stays where it was, at
    anything else: a HetConv or a protected module, a tensor used twice (a residual branch), a
    module called at several places or carrying hooks, a module whose parameters or buffers are
    shared with another module or read directly in a forward (a ``get_attr``, e.g.
    ``F.conv2d(y, self.post.weight)``), the model's input or output. The model
    computes exactly what it did before.

    Args:
        model (nn.Module): the model; its ``ChannelPermutation`` modules and their neighbours'
            tensors are changed in place.
        protected (iterable of nn.Module): modules that must not absorb a permutation (for
            example convolutions whose weights carry a pattern).

    Returns:
        (list of str, list of str): the paths of the permutations removed (now identities, to be
        dropped by the caller) and of those left.
    """
    protected = {id(m) for m in protected} | _shared_tensor_owners(model)
    nodes = _fx_nodes(model, protected)
    if nodes is None:
        nodes = _sequential_nodes(model, protected)
    absorber = _Absorber(model, nodes)
    absorber.run()
    removed, left = [], []
    for node in nodes:
        if node.path is None or not isinstance(model.get_submodule(node.path), ChannelPermutation):
            continue
        module = model.get_submodule(node.path)
        perm = absorber.perms.get(id(node))
        if perm is not None:
            module.perm.copy_(perm.to(module.perm.device))
        (removed if module.is_identity() else left).append(node.path)
    return sorted(set(removed)), sorted(set(left) - set(removed))


# -- layers between two permutations: what the converters build, and the step that tidies them up -------
def between_permutations(before: Tensor, layer: nn.Module, after: Tensor) -> nn.Module:
    """``layer`` between two channel permutations, ``Sequential(permute_in, layer, permute_out)``
    with the identities left out (``layer`` itself if both are), on ``layer``'s device and in its
    train/eval mode."""
    parts = OrderedDict()
    device = next(layer.parameters()).device
    for name, perm in (("permute_in", before), ("layer", None), ("permute_out", after)):
        if perm is None:
            parts[name] = layer
        elif not torch.equal(perm, torch.arange(perm.numel())):
            parts[name] = ChannelPermutation(perm).to(device)
    return layer if len(parts) == 1 else nn.Sequential(parts).train(layer.training)


def permutation_finisher(wrappers: set[int], protected: list[nn.Module]):
    """A converter's last step (``finish(model, report)``) after it built the
    :func:`between_permutations` modules whose ids are ``wrappers``: absorb the permutations
    (``protected`` as for :func:`absorb_permutations`), drop the identities they leave in the
    wrappers and in those an earlier conversion left (a wrapper with hooks stays whole: its hooks see
    what the replaced module saw), and list the permutations left in ``report.permutations``."""

    def finish(model: nn.Module, report) -> nn.Module:
        if not wrappers:
            return model
        absorb_permutations(model, protected)
        paths: dict[int, list[str]] = {}
        for path, module in model.named_modules(remove_duplicate=False):
            names = set(module._modules)
            if id(module) in wrappers or (type(module) is nn.Sequential and "layer" in names and
                                          names <= {"permute_in", "layer", "permute_out"}):
                paths.setdefault(id(module), []).append(path)
        for where in reversed(paths.values()):  # inner wrappers first: replacing them moves no other path
            wrapper = model.get_submodule(where[0])
            kept = OrderedDict((name, child) for name, child in wrapper.named_children()
                               if not (isinstance(child, ChannelPermutation) and child.is_identity()))
            if len(kept) == len(wrapper._modules) or hook_names(wrapper, state=False):
                continue
            new = kept["layer"] if len(kept) == 1 else nn.Sequential(kept).train(wrapper.training)
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
