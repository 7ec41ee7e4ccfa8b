"""Every dispatch path of a HetConv layer against the definition oracle, forward and backward.

A call's path depends on more than its shapes: the backend (every name in
``sparse_hetconv.backends.BACKENDS``, ``"auto"`` included, in both of autotune's modes), whether
autograd records it (``torch.no_grad``, ``torch.inference_mode``, frozen weights, and switching
between them on one layer), the memory formats of the input and of the weights, the precision
(float64, float32, bfloat16 weights, CPU autocast to bfloat16), stride, kernel, batch (0 and 1
included), the spatial size (1 x 1, sizes under and over ``backends/dense.py: SMALL_PRODUCT``), bias,
what happened before (a first call, a repeated one, one after an in-place weight update, a
``.to()`` of dtype or memory format, a repeated ``eval()``, a change of mode, a write through
``.data`` that the version counter does not see, with no change of mode after it) and whether the
input holds ``inf``
or NaN (docs/design.md §9), and, under autocast, whether the backward runs inside the autocast
region too (``loss.backward()`` in the ``with`` block: a backward's own products are cast down). The property sweeps all of it for the sparse layer, for
:func:`het_conv2d` / :func:`het_conv3d` and for the masked layer (with whatever NaN or ``inf`` its
masked-out ``pwc`` diagonal holds), in 2-D and, smaller, in 3-D, and compares each call with the
float64 oracle of ``tests/helpers.py``: the output and, where autograd records the call, the
gradients of the input and of every parameter. Non-finite values must sit exactly where the
oracle's are (NaN, ``+inf`` and ``-inf`` alike); finite ones agree within the precision's tolerance.

Tolerances, relative to the magnitude of the terms each value sums (the oracle applied to
absolute values, and its gradients): float64 1e-12, float32 1e-5, bfloat16 weights and autocast
2e-2 (8 significant bits: every input, product and output is rounded), three times that for
gradients. Measured over 900 examples: 4e-16, 1.5e-7 and 8.4e-3.

``SMALL_PRODUCT`` is the work under which the dense backend's no-grad calls take one matrix
product instead of a convolution; every layer here is far under it, so each example also draws
whether to lower it to 0 (the convolution route at a small size), and
:func:`test_a_product_over_the_threshold_takes_the_convolution_route` runs one layer genuinely over
it. The second half sweeps autograd beyond a plain backward for every backend and the masked layer
(double backward, forward-mode AD, batched gradients and Jacobians, saved-tensor hooks that change
layout or dtype), each against the float64 oracle: about 50 s on two loaded cores.
Default run: about 20 s on two cores for the first half; ``HYPOTHESIS_PROFILE=thorough`` runs ten times as many
examples of each sweep (8 to 20 minutes).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import assert_agrees, one_by_one_channels, oracle
from sparse_hetconv import MaskedHetConv2d, MaskedHetConv3d, SparseHetConv2d, SparseHetConv3d, autotune
from sparse_hetconv.backends import BACKENDS, dense
from sparse_hetconv.backends import available as backend_available
from sparse_hetconv.functional import het_conv2d, het_conv3d

THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
EXAMPLES = {2: 3000 if THOROUGH else 300, 3: 1500 if THOROUGH else 150}
MODES = ("grad", "no_grad", "inference", "frozen")
PRECISIONS = {"float64": (torch.float64, False), "float32": (torch.float32, False),
              "bfloat16": (torch.bfloat16, False), "autocast": (torch.float32, True)}
EVENTS = ("none", "none", "update", "to_format", "to_dtype", "diagonal", "eval", "toggle", "data_write")
NEXT_DTYPE = {torch.float32: torch.float64, torch.float64: torch.float32, torch.bfloat16: torch.float32}


def available(name: str) -> bool:
    """Whether backend ``name`` is swept here: ``"auto"`` always; a backend where the registry says
    it runs on the CPU, except ``triton`` under Triton's interpreter (exact but far too slow for a
    sweep: tests/backends/test_triton.py covers it there; on CUDA, gpu_check runs it)."""
    if name == "auto":
        return True
    if name == "triton" and not torch.cuda.is_available():
        return False
    return backend_available(name, "cpu")


BACKENDS_HERE = [name for name in BACKENDS if available(name)]
FORMS = BACKENDS_HERE + ["functional", "masked"]


def test_every_backend_is_swept():
    """Every registered backend is swept here, but triton without CUDA (covered by its own file)."""
    missing = {name for name in BACKENDS if name not in BACKENDS_HERE}
    expected = set() if torch.cuda.is_available() else {"triton"}
    assert missing == expected, f"backends not swept: {sorted(missing)} (expected only {sorted(expected)})"


class Functional(nn.Module):
    """The parameters of a sparse layer, applied through :func:`het_conv2d` / ``3d``."""

    def __init__(self, layer: SparseHetConv2d | SparseHetConv3d, backend: str) -> None:
        super().__init__()
        self.weight_kxk, self.weight_1x1, self.bias = layer.weight_kxk, layer.weight_1x1, layer.bias
        self.stride, self.part, self.backend, self.dims = layer.stride, layer.part, backend, layer._dims

    def forward(self, x):
        call = het_conv2d if self.dims == 2 else het_conv3d
        return call(x, self.weight_kxk, self.weight_1x1, self.bias, self.stride, self.part, self.backend)


@dataclass
class Case:
    form: str
    dims: int
    M: int
    N: int
    P: int
    k: int
    stride: int
    bias: bool
    batch: int
    spatial: tuple
    precision: str
    weights_cl: bool
    input_cl: bool
    calls: list = field(default_factory=list)  # (mode, event after the call)
    small_product: bool = True
    measure: bool = False
    backward_in_autocast: bool = False  # ``loss.backward()`` inside the ``with torch.autocast`` block
    nonfinite: list = field(default_factory=list)  # (position in [0, 1), value)
    seed: int = 0


@st.composite
def cases(draw, dims: int):
    part = draw(st.sampled_from([1, 2, 3, 4]))
    m, n = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sizes = [1, 2, 3, 5, 7] if dims == 2 else [1, 2, 3]
    form = draw(st.sampled_from(FORMS))
    calls = draw(st.lists(st.tuples(st.sampled_from(MODES), st.sampled_from(EVENTS)), min_size=1, max_size=4))
    nonfinite = draw(st.one_of(st.just([]), st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from([math.inf, -math.inf, math.nan])),
        min_size=1, max_size=3)))
    return Case(
        form=form, dims=dims, M=part * m, N=part * n, P=part,
        k=draw(st.sampled_from([3, 5] if dims == 2 else [3])), stride=draw(st.sampled_from([1, 2])),
        bias=draw(st.booleans()), batch=draw(st.sampled_from([0, 1, 1, 2])),
        spatial=tuple(draw(st.sampled_from(sizes)) for _ in range(dims)),
        precision=draw(st.sampled_from(list(PRECISIONS))),
        weights_cl=draw(st.booleans()), input_cl=draw(st.booleans()), calls=calls,
        small_product=draw(st.booleans()), measure=form == "auto" and draw(st.booleans()),
        backward_in_autocast=draw(st.booleans()),
        nonfinite=nonfinite, seed=draw(st.integers(0, 2**16)),
    )


def fmt(dims: int, cl: bool):
    return (torch.channels_last if dims == 2 else torch.channels_last_3d) if cl else torch.contiguous_format


def build(case: Case) -> nn.Module:
    torch.manual_seed(case.seed)
    args = (case.M, case.N, case.P, case.k, case.stride, case.bias)
    if case.form == "masked":
        module = (MaskedHetConv2d if case.dims == 2 else MaskedHetConv3d)(*args, dtype=torch.float64)
    else:
        layer = (SparseHetConv2d if case.dims == 2 else SparseHetConv3d)(
            *args, backend="auto" if case.form == "functional" else case.form, dtype=torch.float64)
        module = Functional(layer, "auto") if case.form == "functional" else layer
    dtype, _ = PRECISIONS[case.precision]
    return module.to(dtype).to(memory_format=fmt(case.dims, case.weights_cl))


def reference(case: Case, params64: dict):
    """(weight_kxk, compact 1x1 values, bias) for the oracle, from float64 copies of the parameters;
    the masked form's values are read off ``pwc`` by definition (its diagonal never read)."""
    if case.form != "masked":
        return params64["weight_kxk"], params64.get("weight_1x1"), params64.get("bias")
    dense_1x1 = params64["pwc.weight"].reshape(case.N, case.M)
    values = torch.stack([dense_1x1[j, one_by_one_channels(j, case.M, case.N, case.P)] for j in range(case.N)])
    return params64["gwc.weight"], values, params64.get("gwc.bias")


def tolerance(dtype: torch.dtype, autocast: bool) -> float:
    if autocast or dtype == torch.bfloat16:
        return 2e-2
    return 1e-5 if dtype == torch.float32 else 1e-12


def agree(got: torch.Tensor | None, expected: torch.Tensor | None, scale: torch.Tensor | None, tol: float,
          what: str) -> None:
    """:func:`helpers.assert_agrees`, where a parameter neither reaches counts as a zero gradient."""
    if expected is None and got is None:
        return  # (the 1 x 1 part of a part-1 layer)
    if expected is None:
        expected = scale = torch.zeros(got.shape, dtype=torch.float64)
    assert_agrees(got, expected, what, tol, scale)


def mode_context(mode: str):
    if mode == "no_grad":
        return torch.no_grad()
    if mode == "inference":
        return torch.inference_mode()
    return torch.enable_grad()


def master_input(case: Case) -> torch.Tensor:
    x = torch.randn((case.batch, case.M) + case.spatial, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(case.seed + 1))
    flat = x.view(-1)
    for position, value in case.nonfinite:
        if flat.numel():
            flat[int(position * flat.numel())] = value
    return x


def check_call(case: Case, module: nn.Module, x64: torch.Tensor, mode: str, autocast: bool, what: str) -> None:
    dtype = next(module.parameters()).dtype
    x = x64.to(dtype, copy=True).contiguous(memory_format=fmt(case.dims, case.input_cl))
    params = dict(module.named_parameters())
    grad = mode == "grad"
    if mode == "frozen":
        for p in params.values():
            p.requires_grad_(False)
    x.requires_grad_(grad)
    try:
        with mode_context(mode), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = module(x)
    finally:
        for p in params.values():
            p.requires_grad_(True)
    x_ref = x.detach().double().contiguous().requires_grad_(grad)  # (NCHW: the oracle's slices are faster)
    params64 = {name: p.detach().double().requires_grad_(grad) for name, p in params.items()}
    expected = oracle(x_ref, *reference(case, params64), case.stride, case.P)
    # The magnitude of the terms each value sums: the oracle on absolute values (its gradients too).
    x_abs = x_ref.detach().abs().requires_grad_(grad)
    params_abs = {name: p.detach().abs().requires_grad_(grad) for name, p in params64.items()}
    scale = oracle(x_abs, *reference(case, params_abs), case.stride, case.P)
    tol = tolerance(dtype, autocast)
    if not autocast:
        assert out.dtype == dtype, f"{what}: output dtype {out.dtype}, expected {dtype}"
    elif dtype == torch.float32:
        assert out.dtype == torch.bfloat16, f"{what}: autocast output dtype {out.dtype}, expected bfloat16"
    agree(out, expected, scale, tol, f"{what}: output")
    assert out.requires_grad == grad, f"{what}: output requires_grad is {out.requires_grad}"
    if not grad:
        return
    weight = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(case.seed + 2))
    names = list(params)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and case.backward_in_autocast):
        got = torch.autograd.grad((out.double() * weight).sum(), [x] + [params[n] for n in names],
                                  allow_unused=True)
    wanted = torch.autograd.grad((expected * weight).sum(), [x_ref] + [params64[n] for n in names],
                                 allow_unused=True)
    scales = torch.autograd.grad((scale * weight.abs()).sum(), [x_abs] + [params_abs[n] for n in names],
                                 allow_unused=True)
    for name, g, e, magnitude in zip(["input"] + names, got, wanted, scales):
        if g is None and case.batch == 0:
            continue  # an empty batch reaches no parameter through a size-0 product
        agree(g, e, magnitude, 3 * tol, f"{what}: gradient of {name}")


def apply_event(case: Case, module: nn.Module, event: str) -> nn.Module:
    if event == "update":  # what an optimizer step does: in place, under no_grad
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(-0.5).add_(0.125)
    elif event == "to_format":  # flip the weights' memory format
        cl = next(p for p in module.parameters() if p.dim() == case.dims + 2).is_contiguous(
            memory_format=fmt(case.dims, True))
        module = module.to(memory_format=fmt(case.dims, not cl))
    elif event == "to_dtype":
        module = module.to(NEXT_DTYPE[next(module.parameters()).dtype])
    elif event == "eval":  # evaluation loops call eval() per batch
        module.eval()
    elif event == "toggle":
        module.train(not module.training)
    elif event == "data_write":  # an EMA update: bypasses the version counter (no change of mode after it)
        for p in module.parameters():
            p.data.mul_(-0.5).add_(0.125)
    elif event == "diagonal" and case.form == "masked" and case.P > 1:
        with torch.no_grad():  # what the masked-out diagonal holds is no part of the layer
            pattern = module.pattern
            dense_1x1 = module.pwc.weight.view(case.N, case.M)
            garbage = torch.tensor([math.nan, math.inf, -math.inf, 1e30], dtype=dense_1x1.dtype)
            count = case.N * (case.M // case.P)
            dense_1x1.masked_scatter_(~pattern.mask_1x1(), garbage.repeat(count)[:count])
    return module


def run_case(case: Case) -> None:
    autotune.clear()
    module = build(case)
    x64 = master_input(case)
    _, autocast = PRECISIONS[case.precision]
    threshold = contextlib.nullcontext() if case.small_product else mock.patch.object(dense, "SMALL_PRODUCT", 0)
    measure = autotune.mode("measure") if case.measure else contextlib.nullcontext()
    with threshold, measure:
        for i, (mode, event) in enumerate(case.calls):
            check_call(case, module, x64, mode, autocast, f"call {i} ({mode}) of {case}")
            module = apply_event(case, module, event)
    autotune.clear()


@settings(max_examples=EXAMPLES[2])
@given(cases(dims=2))
def test_every_dispatch_path_matches_the_oracle_2d(case):
    run_case(case)


@settings(max_examples=EXAMPLES[3])
@given(cases(dims=3))
def test_every_dispatch_path_matches_the_oracle_3d(case):
    run_case(case)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_a_product_over_the_threshold_takes_the_convolution_route(channels_last):
    """The one layer here whose 1 x 1 product is over ``SMALL_PRODUCT`` without patching it."""
    M = N = 32
    batch, spatial = 4, (96, 96)
    assert batch * math.prod(spatial) * M * N > dense.SMALL_PRODUCT, "the case must be over the threshold"
    case = Case(form="dense", dims=2, M=M, N=N, P=4, k=3, stride=1, bias=True, batch=batch, spatial=spatial,
                precision="float32", weights_cl=channels_last, input_cl=channels_last,
                calls=[("no_grad", "update"), ("inference", "none")])  # (the threshold is for no-grad calls)
    run_case(case)


# -- autograd beyond a plain backward ---------------------------------------------------------------------
# Every backend (triton too where it runs: tiny shapes, Triton's CPU interpreter is slow) and the masked
# layer, for the default geometry and a strided, dilated, reflect-padded one: double backward (a gradient
# penalty), forward-mode AD (torch.autograd.forward_ad and torch.func.jvp), batched gradients
# (is_grads_batched, jacobian(vectorize=True)) and saved-tensor hooks that hand the saved tensors back
# in another memory layout or through another dtype. Each against the float64 oracle: the same
# numbers, or the test fails (no feature may give silently different ones).
AUTOGRAD_FEATURES = ("double_backward", "forward_ad", "func_jvp", "grads_batched", "jacobian", "save_on_cpu",
                     "layout_hooks", "float64_hooks")
AUTOGRAD_FORMS = [name for name in BACKENDS if name != "triton" or backend_available("triton", "cpu")] + ["masked"]
GEOMETRY = {"default": {}, "strided": {"stride": 2, "dilation": 2, "padding_mode": "reflect"}}
AM, AN, AP = 4, 4, 2  # channels and part: tiny


def autograd_layer(form: str, geometry: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(7)
    kwargs = dict(bias=True, dtype=dtype, **GEOMETRY[geometry])
    if form == "masked":
        return MaskedHetConv2d(AM, AN, AP, **kwargs)
    return SparseHetConv2d(AM, AN, AP, backend=form, **kwargs)


def reference_fn(layer: nn.Module):
    """``f(x, params) -> y``: the oracle of the layer's geometry for these parameter values (any
    dtype; run it in float64)."""
    mode, padding = layer.padding_mode, layer.padding

    def f(x, params):
        if layer.padding_mode != "zeros":
            x = torch.nn.functional.pad(x, [p for size in reversed(padding) for p in (size, size)], mode=mode)
        pad = (0, 0) if mode != "zeros" else padding
        if isinstance(layer, MaskedHetConv2d):
            dense_1x1 = params["pwc.weight"].reshape(AN, AM)
            values = torch.stack([dense_1x1[j, one_by_one_channels(j, AM, AN, AP)] for j in range(AN)])
            weights = params["gwc.weight"], values, params.get("gwc.bias")
        else:
            weights = params["weight_kxk"], params.get("weight_1x1"), params.get("bias")
        return oracle(x, *weights, layer.stride, layer.part, pad, layer.dilation)

    return f


def layer_fn(layer: nn.Module):
    return lambda x, params: torch.func.functional_call(layer, params, (x,))


class _Relayout(torch.autograd.graph.saved_tensors_hooks):
    """Hands every saved 4-D tensor back in the other memory format (contiguous <-> channels-last)."""

    def __init__(self):
        def pack(t):
            if t.dim() != 4:
                return t
            if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
                return t.contiguous()
            return t.contiguous(memory_format=torch.channels_last)

        super().__init__(pack, lambda t: t)


class _ThroughFloat64(torch.autograd.graph.saved_tensors_hooks):
    """Stores every saved floating tensor as float64 and hands it back in its own dtype."""

    def __init__(self):
        def pack(t):
            return (t.double(), t.dtype) if t.is_floating_point() else (t, None)

        def unpack(packed):
            return packed[0] if packed[1] is None else packed[0].to(packed[1])

        super().__init__(pack, unpack)


def run_feature(feature: str, f, x: torch.Tensor, params: dict, seed: int):
    """The feature's results for ``f(x, params)``: a list of tensors (None where nothing reaches)."""
    g = torch.Generator().manual_seed(seed)
    names = list(params)
    leaves = [x] + [params[n] for n in names]
    if feature == "double_backward":  # a gradient penalty: d/d(x, w) of |dL/dx|^2, L = |y|^2 / 2
        y = f(x, params)
        gx, = torch.autograd.grad((y * y).sum() / 2, x, create_graph=True)
        return list(torch.autograd.grad((gx * gx).sum(), leaves, allow_unused=True))
    if feature in ("forward_ad", "func_jvp"):
        tangents = [torch.randn(t.shape, dtype=torch.float64, generator=g).to(t.dtype) for t in leaves]
        if feature == "func_jvp":
            _, tangent = torch.func.jvp(f, (x, params), (tangents[0], dict(zip(names, tangents[1:]))))
            return [tangent]
        with torch.autograd.forward_ad.dual_level():
            duals = [torch.autograd.forward_ad.make_dual(t.detach(), d) for t, d in zip(leaves, tangents)]
            out = f(duals[0], dict(zip(names, duals[1:])))
            return [torch.autograd.forward_ad.unpack_dual(out).tangent]
    if feature == "grads_batched":
        y = f(x, params)
        vectors = torch.randn((3,) + y.shape, dtype=torch.float64, generator=g).to(y.dtype)
        return list(torch.autograd.grad(y, leaves, vectors, is_grads_batched=True, allow_unused=True))
    if feature == "jacobian":  # the input Jacobian, weights frozen (grads_batched covers the weights)
        frozen = {name: p.detach() for name, p in params.items()}
        return [torch.autograd.functional.jacobian(lambda t: f(t, frozen), x.detach(), vectorize=True)]
    hooks = {"save_on_cpu": lambda: torch.autograd.graph.save_on_cpu(pin_memory=False),
             "layout_hooks": _Relayout, "float64_hooks": _ThroughFloat64}.get(feature)
    context = hooks() if hooks is not None else contextlib.nullcontext()
    with context:
        y = f(x, params)
    u = torch.randn(y.shape, dtype=torch.float64, generator=g).to(y.dtype)
    return list(torch.autograd.grad((y * u).sum(), leaves, allow_unused=True))


def check_feature(form: str, feature: str, geometry: str, dtype: torch.dtype) -> None:
    layer = autograd_layer(form, geometry, dtype)
    size = (1, AM, 3, 3) if feature == "jacobian" else (2, AM, 6, 5)
    x64 = torch.randn(size, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    x = x64.to(dtype).requires_grad_()
    params = {name: p for name, p in layer.named_parameters()}
    params64 = {name: p.detach().double().requires_grad_() for name, p in params.items()}
    what = f"{feature} through {form} ({geometry} geometry, {str(dtype)[6:]})"
    got = run_feature(feature, layer_fn(layer), x, params, seed=5)
    expected = run_feature(feature, reference_fn(layer), x.detach().double().requires_grad_(), params64, seed=5)
    names = ["input"] + list(params) if len(got) > 1 else ["result"]
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for name, a, e in zip(names, got, expected):
        if e is None:
            assert a is None or not a.abs().max() > 0, f"{what}: {name} is not zero where the oracle has none"
            continue
        assert_agrees(a, e, f"{what}: {name}", tol)


@pytest.mark.parametrize("feature", AUTOGRAD_FEATURES)
@pytest.mark.parametrize("form", AUTOGRAD_FORMS)
def test_every_autograd_feature_matches_the_oracle_in_float64(form, feature):
    check_feature(form, feature, "default", torch.float64)


@pytest.mark.parametrize("feature", ["double_backward", "forward_ad", "grads_batched"])
@pytest.mark.parametrize("form", [name for name in AUTOGRAD_FORMS if name != "triton"])  # (it refuses the geometry)
def test_autograd_features_with_stride_dilation_and_padding_mode(form, feature):
    """The formulas that depend on the geometry (the operator's and the backends' padding, crop
    and centre offset) under stride 2, dilation 2 and reflect padding."""
    check_feature(form, feature, "strided", torch.float64)


@pytest.mark.parametrize("feature", AUTOGRAD_FEATURES)
@pytest.mark.parametrize("form", ["fused"])
def test_every_autograd_feature_through_the_cpu_kernels_in_float32(form, feature):
    """float32: where ``fused`` (and ``auto``) take the compiled CPU kernels, whose backward reads
    its saved tensors as the hooks return them."""
    check_feature(form, feature, "default", torch.float32)
