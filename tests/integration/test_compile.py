"""``torch.compile`` of HetConv layers and of the sparse VGG-16: no graph breaks, eager results.

``torch._dynamo.explain`` must find one graph and no break for a sparse layer with every backend
but ``torch_sparse`` (whose torch.sparse CSR product dynamo cannot trace: it breaks the graph and
runs eagerly, still exact), in training and in inference, NCHW and channels-last, and for the whole
VGG-16.

The compiled VGG-16 training step is compared with eager training in float64: inductor fuses and
reorders floating-point operations, and three SGD steps through train-mode BatchNorm over a batch
of 4 amplify float32 rounding differences to about 1e-3 in the loss, which would hide real
errors; in float64 the same steps agree to about 1e-11. Tolerance: losses and logits rtol 1e-9,
every parameter and buffer after 3 steps rtol 1e-7 / atol 1e-9. A float32 check of every
backend and the masked form on a small network uses rtol 1e-4 / atol 1e-5.

Inductor compiles the VGG-16 training graphs once (about a minute on two cores, then cached on
disk); the ``fullgraph=True`` run recompiles after ``torch._dynamo.reset()`` and finds them in
inductor's cache.
"""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_close
from sparse_hetconv import MaskedHetConv2d, SparseHetConv2d
from helpers import BACKENDS
from sparse_hetconv.models import VGG, vgg16_cifar

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TRACEABLE = [b for b in BACKENDS if b != "torch_sparse"]
# Inductor compiles C++ for the CPU: without a compiler torch.compile's default backend cannot run.
CXX = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c),
    reason="inductor's CPU code generation needs a C++ compiler")


def explain(module: nn.Module, x: torch.Tensor, grad: bool):
    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        return torch._dynamo.explain(module)(x)


def breaks(explanation) -> str:
    return "; ".join(str(b.reason).splitlines()[0] for b in explanation.break_reasons)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("backend", TRACEABLE)
def test_sparse_layer_has_no_graph_breaks(backend, grad, channels_last):
    layer = SparseHetConv2d(16, 32, part=4, stride=2, bias=True, backend=backend).train(grad)
    x = torch.randn(2, 16, 9, 9)
    if channels_last:
        layer, x = layer.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    explanation = explain(layer, x, grad)
    assert explanation.graph_break_count == 0, f"{backend}: graph breaks: {breaks(explanation)}"
    assert explanation.graph_count == 1, f"{backend}: {explanation.graph_count} graphs"


def test_torch_sparse_backend_breaks_the_graph():
    """Documented limitation: the CSR product runs outside the graph, and the compiled layer stays
    exact (``aot_eager``: dynamo's capture and the autograd graph, without code generation)."""
    layer = SparseHetConv2d(16, 32, part=4, backend="torch_sparse")
    x = torch.randn(2, 16, 9, 9)
    explanation = explain(layer, x, grad=True)
    assert explanation.graph_break_count > 0, "torch_sparse now traces: update docs/compatibility.md"
    torch._dynamo.reset()
    twin = copy.deepcopy(layer)
    out, expected = torch.compile(twin, backend="aot_eager")(x), layer(x)
    assert_close(out, expected, "torch_sparse compiled with graph breaks", rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert_close(twin.weight_1x1.grad, layer.weight_1x1.grad, "torch_sparse compiled: weight_1x1 gradient",
                 rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "dense", "blocked"])
def test_vgg16_has_no_graph_breaks(backend):
    model = vgg16_cifar(part=4, backend=backend)
    explanation = explain(model, torch.randn(2, 3, 32, 32), grad=True)
    assert explanation.graph_break_count == 0, f"VGG-16 ({backend}): graph breaks: {breaks(explanation)}"
    assert explanation.graph_count == 1, f"VGG-16 ({backend}): {explanation.graph_count} graphs"


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_masked_form_has_no_graph_breaks(grad):
    for what, module, x in (("MaskedHetConv2d", MaskedHetConv2d(16, 32, part=4, stride=2, bias=True),
                             torch.randn(2, 16, 9, 9)),
                            ("masked VGG-16", vgg16_cifar(part=4, form="masked"), torch.randn(2, 3, 32, 32))):
        explanation = explain(module.train(grad), x, grad)
        assert explanation.graph_break_count == 0, f"{what}: graph breaks: {breaks(explanation)}"
        assert explanation.graph_count == 1, f"{what}: {explanation.graph_count} graphs"


def train(model: nn.Module, steps: int = 3):
    """Three SGD steps (momentum, weight decay) on fixed batches of 4; returns (logits, losses)."""
    generator = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    first, losses = None, []
    for _ in range(steps):
        x = torch.randn(4, 3, 32, 32, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 10, (4,), generator=generator)
        opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        first = logits.detach() if first is None else first
        losses.append(loss.detach())
    return first, torch.stack(losses)


# The published VGG's structure (standard RGB stem, HetConv + BatchNorm + ReLU, pools, the same
# classifier) with five convolutions instead of thirteen: inductor's compile time grows with the
# number of layers, and what is checked (training through compiled HetConv layers of every kind
# the default model has) is the same. VGG-16 itself is traced by test_vgg16_has_no_graph_breaks.
SMALL_VGG = (16, 32, "M", 32, "M", 64, "M", 64, "M", 64, "M")


@pytest.fixture(scope="module")
def eager_vgg():
    torch.manual_seed(0)
    initial = VGG(SMALL_VGG, part=4).double()  # the default layers: backend "auto", channels-last
    trained = copy.deepcopy(initial)
    logits, losses = train(trained)
    return initial, trained.state_dict(), logits, losses


@CXX
@pytest.mark.parametrize("fullgraph", [False, True], ids=["default", "fullgraph"])
def test_compiled_vgg_training_matches_eager(eager_vgg, fullgraph):
    initial, expected_state, expected_logits, expected_losses = eager_vgg
    model = copy.deepcopy(initial)
    torch._dynamo.reset()
    logits, losses = train(torch.compile(model, fullgraph=fullgraph))
    assert_close(logits, expected_logits, "compiled VGG: logits of the first step", rtol=1e-9, atol=1e-12)
    assert_close(losses, expected_losses, "compiled VGG: loss of each step", rtol=1e-9, atol=1e-12)
    state = model.state_dict()
    for key, expected in expected_state.items():
        assert_close(state[key], expected, f"compiled VGG: {key} after 3 steps", rtol=1e-7, atol=1e-9)


def small_net(device) -> nn.Module:
    """Every traceable backend and the masked form in one network, channels-last."""
    torch.manual_seed(0)
    net = nn.Sequential(
        SparseHetConv2d(16, 32, 4, stride=2, bias=True, backend="dense"), nn.ReLU(),
        SparseHetConv2d(32, 32, 2, backend="grouped"), nn.ReLU(),
        SparseHetConv2d(32, 32, 8, backend="blocked"), nn.ReLU(),
        MaskedHetConv2d(32, 16, 4), nn.ReLU(),
        SparseHetConv2d(16, 16, 4, backend="auto"),
    )
    if torch.device(device).type == "cuda":  # the fused kernel too (on the CPU: tests/backends/test_triton.py)
        net.append(nn.ReLU())
        net.append(SparseHetConv2d(16, 16, 2, backend="triton"))
    return net.to(device, memory_format=torch.channels_last)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=CXX), pytest.param("cuda", marks=CUDA)])
def test_compiled_backends_match_eager_float32(device):
    eager = small_net(device)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module)
    x = torch.randn(3, 16, 9, 9, device=device).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(3, 16, 5, 5, device=device)
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, out = eager(x_eager), compiled(x_compiled)
    expected.backward(grad_out)
    out.backward(grad_out)
    assert_close(out, expected, "compiled output (training)", rtol=1e-4, atol=1e-5)
    assert_close(x_compiled.grad, x_eager.grad, "compiled input gradient", rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled_module.parameters()):
        assert_close(q.grad, p.grad, f"compiled gradient of {name}", rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # inference: another graph (no autograd, prepared weights not cached)
        assert_close(compiled(x), eager(x), "compiled output (no_grad)", rtol=1e-4, atol=1e-5)
        for net in (eager, compiled_module):  # an optimizer-like in-place update of every weight
            for p in net.parameters():
                p.mul_(0.5).add_(0.01)
        assert_close(compiled(x), eager(x), "compiled output (no_grad) after a weight update", rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "dense", "grouped"])
def test_compiled_inference_follows_weight_updates(backend):
    """The layer's prepared-weight cache must stay out of compiled graphs: a compiled no-grad call
    after an in-place update (an optimizer step between evaluations) neither breaks nor goes stale.
    Dynamo only (``backend="eager"``): this is about what gets traced, not about code generation."""
    torch._dynamo.reset()
    layer = SparseHetConv2d(16, 32, part=4, backend=backend).eval()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        for step in range(3):
            assert_close(compiled(x), layer(x), f"{backend}: compiled no-grad call {step}", rtol=1e-6, atol=1e-6)
            layer.weight_1x1.mul_(-0.5)
            layer.weight_kxk.add_(0.01)


@CXX
def test_frozen_compile_freezes_only_its_own_graphs():
    """FrozenCompiled (compile_int8's and the benchmarks' compiled variants) folds its model's
    weights at compilation; a plain torch.compile after it still reads weights at each call."""
    import torch._inductor.config as inductor_config

    from sparse_hetconv._frozen import FrozenCompiled

    torch._dynamo.reset()
    frozen_layer = SparseHetConv2d(8, 8, 2, backend="dense").eval()
    plain_layer = copy.deepcopy(frozen_layer)
    frozen, plain = FrozenCompiled(frozen_layer), torch.compile(plain_layer)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        before = frozen(x)
        assert_close(plain(x), plain_layer(x), "plain compiled layer", rtol=1e-5, atol=1e-6)
        for layer in (frozen_layer, plain_layer):
            layer.weight_kxk.mul_(-1.0)
        assert_close(frozen(x), before, "the frozen graph keeps the weights it was compiled with", rtol=0, atol=0)
        assert_close(plain(x), plain_layer(x), "plain compiled layer after a weight update", rtol=1e-5, atol=1e-6)
    assert inductor_config.freezing is False, "FrozenCompiled changed the process's setting"
    assert [name for name, _ in frozen.named_parameters()] == ["module.weight_kxk", "module.weight_1x1"]
