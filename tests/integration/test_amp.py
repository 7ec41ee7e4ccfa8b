"""Automatic mixed precision: ``torch.autocast`` with bfloat16 on the CPU, float16 and bfloat16 on CUDA.

Under autocast the convolutions and matrix products run in the lower precision while the
parameters stay float32; a HetConv layer must give finite outputs close to its float32 result and
send float32 gradients to ``weight_1x1`` (``pwc.weight`` in the masked form).

Tolerances, as relative errors ``||a - b|| / ||b||`` against float32: bfloat16 keeps 8 significant
bits (a rounding error of 2**-9 = 0.2 % per value), float16 11 bits. A layer is held to 2 % for
bfloat16 and 0.5 % for float16, outputs and gradients alike (measured: 0.3-0.4 % for bfloat16);
VGG-16's output in eval mode (13 layers) to 3 % for bfloat16 and 1 % for float16 (measured 0.2-0.3 %
on the CPU). Its gradients drift further through 13 low-precision layers (5-30 % on the CPU, in
both forms), so there the sparse form is held to the published masked form's accuracy (at most
1.5 times its error plus 1 %). In train mode BatchNorm normalises with the statistics of a batch
of 4, which amplifies rounding (10-20 % output differences, in both forms): only finiteness and
float32 gradients are checked there.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import BACKENDS
from sparse_hetconv import MaskedHetConv2d, SparseHetConv2d, autotune, to_masked
from sparse_hetconv.models import vgg16_cifar

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CASES = [("cpu", torch.bfloat16)] + [
    pytest.param("cuda", dtype, marks=CUDA) for dtype in (torch.float16, torch.bfloat16)
]
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
VGG_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().float(), expected.detach().float()
    return float((actual - expected).norm() / expected.norm())


def one_by_one_weight(layer):
    return layer.pwc.weight if isinstance(layer, MaskedHetConv2d) else layer.weight_1x1


def make_layer(form: str, device) -> torch.nn.Module:
    torch.manual_seed(0)
    if form == "masked":
        return MaskedHetConv2d(32, 64, part=4, stride=2, bias=True, device=device)
    return SparseHetConv2d(32, 64, part=4, stride=2, bias=True, backend=form, device=device)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
@pytest.mark.parametrize("form", list(BACKENDS) + ["masked", "triton"])
@pytest.mark.parametrize("device,dtype", CASES)
def test_layer_under_autocast(device, dtype, form, memory_format):
    if form == "triton" and device != "cuda":
        pytest.skip("the triton backend's CPU runs (Triton's interpreter) are tested in tests/backends/test_triton.py")
    layer = make_layer(form, device).to(memory_format=memory_format)
    x = torch.randn(4, 32, 9, 9, device=device).contiguous(memory_format=memory_format)
    expected = layer(x)
    expected.square().mean().backward()
    expected_grad = one_by_one_weight(layer).grad.clone()
    layer.zero_grad()

    with torch.autocast(device, dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype, f"{form}: autocast output should be {dtype}, got {y.dtype}"
    assert torch.isfinite(y).all(), f"{form}: non-finite output under autocast"
    error = relative_error(y, expected)
    assert error < TOLERANCE[dtype], f"{form}: output differs from float32 by {error:.2%}"
    y.float().square().mean().backward()
    grad = one_by_one_weight(layer).grad
    assert grad is not None and grad.dtype == torch.float32, f"{form}: weight_1x1 needs a float32 gradient"
    error = relative_error(grad, expected_grad)
    assert error < TOLERANCE[dtype], f"{form}: weight_1x1 gradient differs from float32 by {error:.2%}"
    assert all(p.dtype == torch.float32 for p in layer.parameters()), "autocast must not change parameters"

    with torch.no_grad(), torch.autocast(device, dtype=dtype):  # the inference-only paths
        y = layer(x)
    error = relative_error(y, expected)
    assert y.dtype == dtype and error < TOLERANCE[dtype], f"{form}: no-grad autocast output off by {error:.2%}"


def eval_mode_grads(model, x, target, dtype=None):
    """Output and the gradients of all parameters, in float32 or under autocast to ``dtype``."""
    model.eval()
    model.zero_grad()
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(x)
        loss = F.cross_entropy(out, target)
    loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("device,dtype", CASES)
@autotune.mode("model")  # what auto runs is not the question here; its one-off timings of 13 layers took most of it
def test_vgg16_under_autocast(device, dtype):
    torch.manual_seed(0)
    sparse = vgg16_cifar(part=4, form="sparse").to(device)
    x = torch.randn(4, 3, 32, 32, device=device)
    target = torch.randint(0, 10, (4,), device=device)
    with torch.no_grad():  # BatchNorm statistics that are not the defaults
        sparse(x)
    masked = to_masked(sparse)
    errors = {}
    for form, model in (("sparse", sparse), ("masked", masked)):
        expected, expected_grads = eval_mode_grads(model, x, target)
        out, grads = eval_mode_grads(model, x, target, dtype)
        error = relative_error(out, expected)
        assert torch.isfinite(out).all() and error < VGG_TOLERANCE[dtype], f"{form} VGG-16 eval: off by {error:.2%}"
        for name, grad in grads.items():
            assert grad.dtype == torch.float32, f"{form} {name}: gradient is {grad.dtype}, expected float32"
            assert torch.isfinite(grad).all(), f"{form} {name}: non-finite gradient"
        errors[form] = [relative_error(grads[name], expected_grads[name]) for name in sorted(grads)
                        if name.endswith(("weight_1x1", "pwc.weight"))]
    # Through 13 layers the low-precision gradients drift (up to ~30 % in the first HetConv layer,
    # in both forms); the sparse layer must be no less accurate than the published masked one.
    assert len(errors["sparse"]) == len(errors["masked"]) == 12
    for layer, (ours, published) in enumerate(zip(errors["sparse"], errors["masked"])):
        assert ours <= 1.5 * published + 0.01, (
            f"HetConv layer {layer}: sparse gradient off by {ours:.1%}, masked by {published:.1%}")

    for form, model in (("sparse", sparse), ("masked", masked)):
        model.train()
        model.zero_grad()
        with torch.autocast(device, dtype=dtype):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        assert torch.isfinite(loss), f"{form} VGG-16 train: non-finite loss under autocast"
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32, f"{form} {name}: no float32 gradient"
            assert torch.isfinite(p.grad).all(), f"{form} {name}: non-finite gradient in train mode"
