"""Exporting HetConv models: ``torch.export.export``, ONNX (run in onnxruntime) and ``torch.jit.trace``.

Every backend but ``torch_sparse`` exports (torch.export cannot trace torch.sparse CSR tensors; the
layer says so and names the exact alternatives). With a dynamic batch dimension ``backend="auto"``
has no concrete shape to choose by and uses ``dense``. Tolerances: the exported program runs the
same aten operations as eager, but eager inference may use oneDNN's fused sum, so rtol 1e-5 /
atol 1e-6; onnxruntime runs its own kernels: rtol 1e-4 / atol 1e-5.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn
from torch.export import Dim

from helpers import assert_close
from sparse_hetconv import MaskedHetConv2d, SparseHetConv2d
from helpers import BACKENDS
from sparse_hetconv.models import vgg16_cifar

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
EXPORTABLE = [b for b in BACKENDS if b != "torch_sparse"]
BATCH = Dim("batch", min=1, max=256)


def trained_vgg(form: str, backend: str = "auto", device="cpu") -> nn.Module:
    """VGG-16 (P = 4) with BatchNorm statistics that are not the defaults, in eval mode."""
    torch.manual_seed(0)
    model = vgg16_cifar(part=4, form=form, backend=backend).to(device) if form == "sparse" \
        else vgg16_cifar(part=4, form=form).to(device)
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32, device=device))
    return model.eval()


def small_net(form: str) -> nn.Module:
    """Two HetConv layers (stride 2, bias, P = 4 and 8) and a classifier head, channels-last."""
    torch.manual_seed(0)
    if form == "masked":
        convs = [MaskedHetConv2d(16, 32, 4, stride=2, bias=True), MaskedHetConv2d(32, 32, 8)]
    else:
        convs = [SparseHetConv2d(16, 32, 4, stride=2, bias=True, backend=form),
                 SparseHetConv2d(32, 32, 8, backend=form)]
    net = nn.Sequential(convs[0], nn.ReLU(), convs[1], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))
    return net.to(memory_format=torch.channels_last).eval()


def run(model, x):
    with torch.no_grad():
        return model(x)


# -- torch.export ---------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["sparse", "masked"])
def test_torch_export_vgg16(form):
    """The default model (``backend="auto"``) with a dynamic batch dimension."""
    model = trained_vgg(form)
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: BATCH}})
    assert set(program.state_dict) == set(model.state_dict()), "the program's state must be the model's"
    for batch in (2, 3):  # the example's batch size and another one
        x = torch.randn(batch, 3, 32, 32)
        assert_close(run(program.module(), x), run(model, x), f"{form}: exported VGG-16, batch {batch}",
                     rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("form", EXPORTABLE + ["masked"])
def test_torch_export_every_backend(form, dynamic):
    """Static shapes keep ``auto``'s per-layer choice; a dynamic batch makes it ``dense``."""
    model = small_net(form)
    x = torch.randn(3, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: BATCH},) if dynamic else None)
    assert_close(run(program.module(), x), run(model, x), f"{form}: exported program", rtol=1e-5, atol=1e-6)
    if dynamic:
        x = torch.randn(5, 16, 9, 9)
        assert_close(run(program.module(), x), run(model, x), f"{form}: exported program, batch 5",
                     rtol=1e-5, atol=1e-6)


def test_torch_sparse_backend_refuses_export():
    layer = SparseHetConv2d(16, 16, 4, backend="torch_sparse").eval()
    with pytest.raises(ValueError, match="'torch_sparse' cannot be exported.*'dense', 'grouped' or 'blocked'"):
        torch.export.export(layer, (torch.randn(1, 16, 4, 4),))


@CUDA
def test_torch_export_on_cuda():
    model = trained_vgg("sparse", device="cuda")
    x = torch.randn(2, 3, 32, 32, device="cuda")
    program = torch.export.export(model, (x,))
    assert_close(run(program.module(), x), run(model, x), "exported VGG-16 on CUDA", rtol=1e-4, atol=1e-5)


# -- ONNX -----------------------------------------------------------------------------------------
def onnx_outputs(model: nn.Module, example: torch.Tensor, inputs: list[torch.Tensor], path, dynamic: bool):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev extra")
    pytest.importorskip("onnxscript", reason="onnxscript is in the dev extra (torch.onnx's exporter needs it)")
    shapes = {"x": {0: BATCH}} if dynamic else None
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamic_shapes=shapes, dynamo=True, verbose=False)
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [torch.from_numpy(session.run(None, {name: x.numpy()})[0]) for x in inputs]


@pytest.mark.parametrize("form", ["sparse", "masked"])
def test_onnx_vgg16_in_onnxruntime(form, tmp_path):
    model = trained_vgg(form)
    inputs = [torch.randn(2, 3, 32, 32), torch.randn(5, 3, 32, 32)]
    got = onnx_outputs(model, inputs[0], inputs, tmp_path / "vgg16.onnx", dynamic=True)
    for x, y in zip(inputs, got):
        assert_close(y, run(model, x), f"{form} VGG-16 in onnxruntime, batch {x.shape[0]}", rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", EXPORTABLE + ["masked"])
def test_onnx_every_backend(form, tmp_path):
    model = small_net(form)
    x = torch.randn(3, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    (got,) = onnx_outputs(model, x, [x], tmp_path / "net.onnx", dynamic=False)
    assert_close(got, run(model, x), f"{form}: onnxruntime", rtol=1e-4, atol=1e-5)


# -- torch.jit.trace (what fvcore and the legacy ONNX exporter use) -------------------------------
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("form", list(BACKENDS) + ["masked"])
def test_jit_trace(form, grad):
    model = small_net(form)
    x = torch.randn(2, 16, 9, 9)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, still used by fvcore
        traced = torch.jit.trace(model, (x,), check_trace=False)
    x = torch.randn(2, 16, 9, 9)
    assert_close(run(traced, x), run(model, x), f"{form}: traced module", rtol=1e-5, atol=1e-6)
