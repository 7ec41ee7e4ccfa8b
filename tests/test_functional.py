"""Every form and backend against the definition oracle, forward and backward, in float64."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from helpers import BACKENDS, assert_agrees, assert_close, masked_reference_weights, oracle, oracle_of
from sparse_hetconv import MaskedHetConv2d, MaskedHetConv3d, SparseHetConv2d, SparseHetConv3d
from sparse_hetconv.functional import het_conv, het_conv2d, het_conv3d


@st.composite
def layer_shapes(draw, dims=2):
    part = draw(st.integers(1, 4))
    m = draw(st.integers(1, 3))
    n = draw(st.integers(1, 3))
    kernel = draw(st.sampled_from([1, 3, 5] if dims == 2 else [1, 3]))
    stride = draw(st.integers(1, 3))
    batch = draw(st.integers(0, 2))
    spatial = tuple(draw(st.integers(1, 7 if dims == 2 else 4)) for _ in range(dims))
    bias = draw(st.booleans())
    return dict(M=part * m, N=part * n, P=part, k=kernel, stride=stride, batch=batch, spatial=spatial, bias=bias)


def _loss_grads(out, inputs, seed=0):
    """Gradients of a random linear functional of ``out`` with respect to ``inputs``."""
    weight = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    present = [t for t in inputs if t is not None]
    grads = torch.autograd.grad((out * weight).sum(), present, allow_unused=True)
    return grads


def _check_layer_against_oracle(layer, reference_params, x, what):
    x = x.clone().requires_grad_(True)
    expected = oracle(x, *reference_params, layer.stride, layer.part)
    got = layer(x)
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != oracle {tuple(expected.shape)}"
    assert_close(got, expected, f"{what} forward")
    if x.shape[0] == 0:
        return
    expected_grads = _loss_grads(expected, [x, *reference_params])
    got_grads = _loss_grads(got, [x, *reference_params])
    for g, e, name in zip(got_grads, expected_grads, ["input", "weight_kxk", "weight_1x1", "bias"]):
        if e is None:
            continue
        assert g is not None, f"{what}: no gradient reached {name}"
        assert_close(g, e, f"{what} gradient of {name}")


def _sparse_layer(s, backend, dims=2):
    cls = SparseHetConv2d if dims == 2 else SparseHetConv3d
    return cls(s["M"], s["N"], s["P"], s["k"], s["stride"], s["bias"], backend=backend, dtype=torch.float64)


@given(layer_shapes())
def test_sparse_backends_match_oracle_2d(s):
    x = torch.randn((s["batch"], s["M"]) + s["spatial"], dtype=torch.float64)
    for backend in BACKENDS:
        layer = _sparse_layer(s, backend)
        params = [layer.weight_kxk, layer.weight_1x1, layer.bias]
        _check_layer_against_oracle(layer, params, x, f"SparseHetConv2d[{backend}] {s}")


@given(layer_shapes())
def test_masked_form_matches_oracle_2d(s):
    layer = MaskedHetConv2d(s["M"], s["N"], s["P"], s["k"], s["stride"], s["bias"], dtype=torch.float64)
    x = torch.randn((s["batch"], s["M"]) + s["spatial"], dtype=torch.float64)
    # The oracle reads the masked layer's own parameters (the pwc block diagonal is never read).
    kxk, values, bias = masked_reference_weights(layer)
    x_ = x.clone().requires_grad_(True)
    expected = oracle(x_, kxk, values, bias, layer.stride, layer.part)
    assert_close(layer(x_), expected, f"MaskedHetConv2d {s} forward")


@given(layer_shapes(dims=3))
def test_3d_forms_match_oracle(s):
    x = torch.randn((s["batch"], s["M"]) + s["spatial"], dtype=torch.float64)
    for backend in BACKENDS:
        layer = _sparse_layer(s, backend, dims=3)
        params = [layer.weight_kxk, layer.weight_1x1, layer.bias]
        _check_layer_against_oracle(layer, params, x, f"SparseHetConv3d[{backend}] {s}")
    masked = MaskedHetConv3d(s["M"], s["N"], s["P"], s["k"], s["stride"], s["bias"], dtype=torch.float64)
    assert_close(masked(x), oracle(x, *masked_reference_weights(masked), masked.stride, masked.part),
                 f"MaskedHetConv3d {s} forward")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride, bias, kernel", [(1, False, 3), (2, True, 3), (1, True, 5)])
def test_gradcheck(backend, stride, bias, kernel):
    torch.manual_seed(0)
    part, m_in, n_out = 2, 4, 4
    x = torch.randn(2, m_in, 5, 4, dtype=torch.float64, requires_grad=True)
    kxk = torch.randn(n_out, m_in // part, kernel, kernel, dtype=torch.float64, requires_grad=True)
    one = torch.randn(n_out, m_in - m_in // part, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n_out, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (x, kxk, one, b)

    def fn(x, kxk, one, b):
        return het_conv2d(x, kxk, one, b, stride=stride, part=part, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs), f"gradcheck failed for backend {backend}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_3d(backend):
    torch.manual_seed(1)
    x = torch.randn(1, 4, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    kxk = torch.randn(2, 2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    one = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: het_conv3d(a, b, c, part=2, stride=2, backend=backend),
                                    (x, kxk, one))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_sends_gradient_to_weight_1x1(backend):
    torch.manual_seed(0)
    layer = SparseHetConv2d(8, 8, part=4, backend=backend)
    layer(torch.randn(2, 8, 6, 6)).square().sum().backward()
    grad = layer.weight_1x1.grad
    assert grad is not None, f"backend {backend}: weight_1x1 received no gradient"
    assert grad.shape == layer.weight_1x1.shape and grad.abs().sum() > 0, f"backend {backend}: zero gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float32, 1e-4, 1e-5), (torch.bfloat16, 5e-2, 5e-2)])
def test_low_precision_close_to_float64(backend, dtype, rtol, atol):
    torch.manual_seed(0)
    layer = SparseHetConv2d(16, 8, part=4, stride=2, bias=True, backend=backend, dtype=torch.float64)
    x = torch.randn(2, 16, 9, 7, dtype=torch.float64)
    expected = oracle_of(layer, x)
    low = SparseHetConv2d(16, 8, part=4, stride=2, bias=True, backend=backend, dtype=dtype)
    low.load_state_dict(layer.state_dict())
    got = low(x.to(dtype))
    assert got.dtype == dtype, f"output dtype {got.dtype}, expected {dtype}"
    scale = expected.abs().max()
    assert_close(got.double() / scale, expected / scale, f"{backend} in {dtype}", rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_input(backend, dims):
    torch.manual_seed(0)
    cls = SparseHetConv2d if dims == 2 else SparseHetConv3d
    layer = cls(8, 12, part=4, stride=2, backend=backend, dtype=torch.float64)
    x = torch.randn((2, 8) + (5,) * dims, dtype=torch.float64)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    x_cl = x.contiguous(memory_format=fmt).requires_grad_(True)
    out = layer(x_cl)
    assert_close(out, oracle_of(layer, x), f"{backend} channels_last {dims}-D")
    out.sum().backward()
    assert_close(x_cl.grad, torch.autograd.grad(oracle_of(layer, x.requires_grad_(True)).sum(), x)[0],
                 f"{backend} channels_last input gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_single_pixel(backend):
    layer = SparseHetConv2d(8, 4, part=2, backend=backend)
    empty = layer(torch.randn(0, 8, 5, 5))
    assert empty.shape == (0, 4, 5, 5), f"batch 0 gives {tuple(empty.shape)}"
    one = layer(torch.randn(1, 8, 1, 1, dtype=torch.float32))
    assert one.shape == (1, 4, 1, 1)


def test_part_one_is_standard_convolution():
    torch.manual_seed(0)
    layer = SparseHetConv2d(6, 5, part=1, stride=2, bias=True, dtype=torch.float64)
    assert layer.weight_1x1 is None, "P=1 has no 1x1 part"
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    expected = F.conv2d(x, layer.weight_kxk, layer.bias, stride=2, padding=1)
    assert_close(layer(x), expected, "P=1 vs F.conv2d")


def test_part_equal_to_channels_leaves_one_kxk_kernel_per_filter():
    layer = SparseHetConv2d(8, 16, part=8, dtype=torch.float64)
    assert layer.weight_kxk.shape == (16, 1, 3, 3) and layer.weight_1x1.shape == (16, 7)
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64)
    assert_close(layer(x), oracle_of(layer, x), "P=M")


def test_functional_rejects_bad_arguments():
    x = torch.randn(1, 8, 4, 4)
    kxk, one = torch.randn(4, 4, 3, 3), torch.randn(4, 4)
    with pytest.raises(ValueError, match=r"backend \('fast'\) must be one of"):
        het_conv2d(x, kxk, one, part=2, backend="fast")
    with pytest.raises(ValueError, match=r"weight_1x1 has shape \(4, 3\), expected \(4, 4\)"):
        het_conv2d(x, kxk, torch.randn(4, 3), part=2)
    with pytest.raises(ValueError, match=r"weight_kxk has shape \(4, 4, 3, 3\), expected \(4, 2, 3, 3\)"):
        het_conv2d(x, kxk, torch.randn(4, 6), part=4)
    with pytest.raises(ValueError, match=r"bias has shape \(3,\), expected \(4,\)"):
        het_conv2d(x, kxk, one, torch.randn(3), part=2)
    with pytest.raises(ValueError, match=r"expects a 4-D input"):
        het_conv(torch.randn(8, 4, 4), kxk, one, part=2)
    with pytest.raises(ValueError, match=r"het_conv3d expects a 5-D weight_kxk"):
        het_conv3d(x, kxk, one, part=2)
    with pytest.raises(ValueError, match=r"in_channels \(8\) must be divisible by part \(3\)"):
        het_conv2d(x, torch.randn(3, 2, 3, 3), torch.randn(3, 6), part=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("part", [1, 4])
@pytest.mark.parametrize("precision", ["bfloat16", "autocast"])
def test_reduced_precision_nonfinite_inputs_follow_the_definition(precision, part, backend):
    """oneDNN's bfloat16 convolutions multiply padding and partial tiles with the input, so an inf
    gave NaN where the definition has +-inf (forward on inputs one pixel high, weight gradients on
    inputs up to two pixels wide; even at part 1, a plain convolution): such calls run in float32."""
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    for shape in [(1, 3), (1, 5), (2, 1), (1, 1), (3, 2)]:
        torch.manual_seed(0)
        x = torch.randn((2, 8) + shape, dtype=dtype)
        x[0, 1, 0, shape[1] // 2] = float("inf")
        x[1, 6, shape[0] - 1, 0] = -float("inf")
        kxk = torch.randn(8, 8 // part, 3, 3, dtype=dtype, requires_grad=True)
        one = torch.randn(8, 8 - 8 // part, dtype=dtype, requires_grad=True) if part > 1 else None
        bias = torch.randn(8, dtype=dtype, requires_grad=True)
        params = [p for p in (kxk, one, bias) if p is not None]
        x_ = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
            got = het_conv2d(x_, kxk, one, bias, part=part, backend=backend)
        assert got.dtype == torch.bfloat16, f"{precision}: output dtype {got.dtype}"
        x64 = x.double().requires_grad_(True)
        params64 = [p.detach().double().requires_grad_(True) for p in params]
        expected = oracle(x64, params64[0], params64[1] if part > 1 else None, params64[-1], 1, part)
        what = f"het_conv2d[{backend}] {precision} part {part} input {shape}"
        assert_agrees(got, expected, f"{what}: output", tol=2e-2)
        have = _loss_grads(got.double(), [x_] + params)
        names = ["input", "weight_kxk"] + (["weight_1x1"] if part > 1 else []) + ["bias"]
        for name, g, e in zip(names, have, _loss_grads(expected, [x64] + params64)):
            assert_agrees(g, e, f"{what}: gradient of {name}", tol=5e-2)
