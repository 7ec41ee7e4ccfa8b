"""The variants the benchmark times: one HetConv layer (or VGG-16) computed in every form.

Every HetConv variant of one (shape, P) is built from the same masked layer, so they all hold
the same weights and their outputs are compared before anything is timed. Names:

* ``standard_nchw`` / ``standard_cl`` — a standard 3 x 3 convolution (VGG-16 with ``P = 1``);
* ``published`` — the published form, NCHW, gradient masking after backward (:mod:`published`);
* ``masked_nchw`` / ``masked_cl`` — :class:`sparse_hetconv.MaskedHetConv2d` (mask in forward);
* ``sparse_<backend>_cl`` — :class:`sparse_hetconv.SparseHetConv2d` pinned to one backend;
* ``sparse_auto_nchw`` / ``sparse_auto_cl`` — ``backend="auto"``; ``sparse_auto_cl`` is what
  ``vgg16_cifar(part)`` and ``to_sparse`` ship by default;
* ``*_fused`` — after :func:`sparse_hetconv.fuse_bn` (whole network, inference only);
* ``*_compiled`` — ``fuse_bn`` then ``torch.compile`` with inductor's ``freezing`` (whole network,
  inference only; compiled on first call, outside the timed rounds);
* ``loop`` — one convolution per filter (the smallest layer shape only).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from sparse_hetconv._frozen import FrozenCompiled
from sparse_hetconv.convert import to_sparse
from sparse_hetconv import fuse_bn
from sparse_hetconv.masked import MaskedHetConv2d
from sparse_hetconv.models import vgg16_cifar
from sparse_hetconv.sparse import SparseHetConv2d
from .published import LoopHetConv, PublishedHetConv, mask_gradients, published_from_masked

CL = torch.channels_last
SPARSE_BACKENDS = ("dense", "grouped", "blocked", "torch_sparse", "fused")
# VGG-16 / CIFAR-10's HetConv layers as (in, out, input size); the 256 and 512 ones repeat.
LAYER_SHAPES = ((64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8), (256, 256, 8), (256, 512, 4),
                (512, 512, 4), (512, 512, 2))
SMALLEST = (512, 512, 2)
CORE = ("standard_nchw", "standard_cl", "published", "masked_nchw", "masked_cl")
SPARSE = tuple(f"sparse_{b}_cl" for b in SPARSE_BACKENDS) + ("sparse_auto_nchw", "sparse_auto_cl")
FUSED = ("standard_cl_fused", "sparse_auto_cl_fused")
COMPILED = ("standard_cl_compiled", "sparse_auto_cl_compiled")
INFERENCE_ONLY = FUSED + COMPILED
ALL = CORE + SPARSE + FUSED + COMPILED + ("loop",)
HETCONV = tuple(v for v in ALL if not v.startswith("standard"))


@dataclass
class Case:
    """One variant, ready to run: its module, optimizer and input layout."""

    name: str
    module: nn.Module
    channels_last: bool
    published: bool = False
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=5e-4)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=CL) if self.channels_last else x.contiguous()

    def forward_fn(self, x: torch.Tensor):
        x = self.layout(x)
        module = self.module

        def run() -> torch.Tensor:
            with torch.no_grad():
                return module(x)

        return run

    def train_fn(self, x: torch.Tensor, target: torch.Tensor):
        """One step: forward, loss, backward, (published: gradient masking), SGD step.

        ``target`` holds class labels for a network and the output gradient for a layer.
        """
        x = self.layout(x)
        module, optimizer, published = self.module, self.optimizer, self.published
        network = target.dtype == torch.int64

        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            out = module(x)
            if network:
                nn.functional.cross_entropy(out, target).backward()
            else:
                out.backward(target)
            if published:
                mask_gradients(module)
            optimizer.step()

        return run


def _cl(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).to(memory_format=CL)


def _published_standard(model: nn.Module) -> nn.Module:
    """VGG-16 with P = 1 in the published form: every conv but the stem as gwc + (zero) pwc."""
    model = copy.deepcopy(model)
    features = model.features
    for index, module in enumerate(features):
        if isinstance(module, nn.Conv2d) and module.in_channels != 3:
            layer = PublishedHetConv(module.in_channels, module.out_channels, 1)
            with torch.no_grad():
                layer.gwc.weight.copy_(module.weight)
            features[index] = layer
    return model._apply(lambda t: t.contiguous())


def _sparse(masked: nn.Module, backend: str, channels_last: bool) -> nn.Module:
    return to_sparse(masked, backend=backend, memory_format=CL if channels_last else torch.contiguous_format)


def _backend(name: str) -> str:
    """``sparse_torch_sparse_cl_fused`` -> ``torch_sparse``."""
    name = name[len("sparse_"):].removesuffix("_fused").removesuffix("_compiled")
    return name.removesuffix("_cl").removesuffix("_nchw")


def _inference(module: nn.Module, name: str) -> nn.Module:
    """``fuse_bn`` for ``*_fused`` and ``*_compiled``; ``torch.compile`` (freezing) for the latter."""
    if name.endswith(("_fused", "_compiled")):
        module = fuse_bn(module.eval())
    if name.endswith("_compiled"):
        # weights folded as constants (what a deployed model gets); one static graph per batch size
        module = FrozenCompiled(module)
    return module


def network_cases(part: int, names, seed: int = 0) -> dict[str, Case]:
    """VGG-16 / CIFAR-10 in each requested variant, all with the same HetConv weights."""
    torch.manual_seed(seed)
    standard = vgg16_cifar(part=1, memory_format=None)
    masked = vgg16_cifar(part=part, form="masked", memory_format=None) if part > 1 else None
    cases = {}
    for name in names:
        if name == "loop":
            continue
        if name.startswith("standard"):
            module = standard if name == "standard_nchw" else _cl(standard)
            cases[name] = Case(name, _inference(module, name), "_cl" in name)
        elif part == 1 and name == "published":
            cases[name] = Case(name, _published_standard(standard), False, published=True)
        elif part == 1:
            continue  # every other form of P = 1 is the standard convolution itself
        elif name == "published":
            cases[name] = Case(name, published_from_masked(masked), False, published=True)
        elif name.startswith("masked"):
            cases[name] = Case(name, masked if name == "masked_nchw" else _cl(masked), name.endswith("_cl"))
        elif name.startswith("sparse_"):
            module = _sparse(masked, _backend(name), "_cl" in name)
            cases[name] = Case(name, _inference(module, name), "_cl" in name)
    return cases


def layer_cases(shape: tuple[int, int, int], part: int, names, seed: int = 0) -> dict[str, Case]:
    """One HetConv layer of ``shape = (in, out, size)`` in each requested variant."""
    in_channels, out_channels, _ = shape
    torch.manual_seed(seed)
    standard = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    masked = MaskedHetConv2d(in_channels, out_channels, part)
    cases = {}
    for name in names:
        if name in INFERENCE_ONLY:
            continue
        if name.startswith("standard"):
            cases[name] = Case(name, standard if name == "standard_nchw" else _cl(standard), name.endswith("_cl"))
        elif name == "published":
            cases[name] = Case(name, published_from_masked(masked), False, published=True)
        elif part == 1:
            continue
        elif name == "loop":
            if tuple(shape) == SMALLEST:
                cases[name] = Case(name, LoopHetConv(masked), False)
        elif name.startswith("masked"):
            cases[name] = Case(name, masked if name == "masked_nchw" else _cl(masked), name.endswith("_cl"))
        elif name.startswith("sparse_"):
            cases[name] = Case(name, _sparse(masked, _backend(name), name.endswith("_cl")), name.endswith("_cl"))
    return cases


def backend_of(case: Case) -> str:
    """The backends the sparse layers of ``case`` last resolved to, e.g. ``"grouped"`` or
    ``"dense x9, grouped x3"`` ("" for non-sparse variants)."""
    found = [m.resolved_backend for m in case.module.modules()
             if isinstance(m, SparseHetConv2d) and m.resolved_backend]
    if not found:
        return ""
    counts = {b: found.count(b) for b in sorted(set(found))}
    if len(counts) == 1:
        return found[0]
    return ", ".join(f"{b} x{c}" for b, c in counts.items())


def memory_case(variant: str, part: int, batch: int = 32, seed: int = 0) -> dict:
    """Builder for :func:`sparse_hetconv.profiling.peak_training_memory`: one network variant."""
    case = network_cases(part, [variant], seed)[variant]
    torch.manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32)
    target = torch.randint(0, 10, (batch,))
    case.module.train()
    return {"step": case.train_fn(x, target), "model": case.module, "optimizer": case.optimizer}
