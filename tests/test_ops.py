"""The registered operator ``torch.ops.sparse_hetconv.het_conv2d`` and its backward operators
(sparse_hetconv/ops/): PyTorch's own operator checks, the definition oracle in float64 for every
code path (the compiled CPU kernels, the stock formulation; Triton's under its interpreter in
tests/backends/test_triton.py), every autograd feature (double backward, forward mode, batched
gradients, saved-tensor hooks of any layout and dtype), graph capture, FLOP counting and the
argument checks of every entry point. No timing is asserted.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from helpers import assert_agrees, oracle
import sparse_hetconv
from sparse_hetconv import SparseHetConv2d, ops

CPU_KERNELS = ops.cpu_kernel() is not None
needs_kernels = pytest.mark.skipif(not CPU_KERNELS, reason=ops.kernel_info())
CL = torch.channels_last


def _layer(M=16, N=24, P=4, k=3, batch=2, size=(6, 5), dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    x = torch.randn((batch, M) + size, dtype=dtype)
    wk = torch.randn(N, M // P, k, k, dtype=dtype)
    w1 = torch.randn(N, M - M // P, dtype=dtype)
    b = torch.randn(N, dtype=dtype) if bias else None
    return x, wk, w1, b


def _geometry(k=3, stride=(1, 1), padding=None, dilation=(1, 1), part=4):
    padding = [d * (k // 2) for d in dilation] if padding is None else padding
    return list(stride), list(padding), list(dilation), part


def _samples(kernel: str):
    """(args, what) of het_conv2d calls that reach each code path and geometry."""
    cases = []
    for dtype in (torch.float32, torch.float64):
        for stride, padding, dilation, bias in (((1, 1), None, (1, 1), True), ((2, 2), None, (1, 1), False),
                                                 ((1, 2), [0, 1], (1, 1), True), ((1, 1), None, (2, 2), False)):
            if kernel == "cpu" and (dtype != torch.float32 or padding is not None or dilation != (1, 1)):
                continue
            x, wk, w1, b = _layer(dtype=dtype, bias=bias)
            if bias:  # (half the cases with channels-last inputs: every output keeps its fake kernel's strides)
                x = x.contiguous(memory_format=CL)
            geometry = _geometry(3, stride, padding, dilation, 4)
            cases.append(((x, wk, w1, b, *geometry, kernel), f"{dtype} stride {stride} padding {padding} dilation {dilation}"))
    return cases


@pytest.mark.parametrize("kernel", ["stock", pytest.param("cpu", marks=needs_kernels)])
def test_opcheck_every_operator(kernel):
    """torch.library.opcheck: schema, autograd registration, fake tensors, AOT dispatch (static and
    dynamic shapes), for the forward operator and both backward operators."""
    for args, what in _samples(kernel):
        x, wk, w1, b, stride, padding, dilation, part, _ = args
        for t in (x, wk, w1, b):
            if t is not None:
                t.requires_grad_()
        torch.library.opcheck(torch.ops.sparse_hetconv.het_conv2d.default, args)
        out = ops.het_conv2d(*args)
        grad = torch.randn_like(out)
        torch.library.opcheck(torch.ops.sparse_hetconv.het_conv2d_grad_input.default,
                              (grad, wk, w1, list(x.shape), stride, padding, dilation, part, kernel))
        torch.library.opcheck(torch.ops.sparse_hetconv.het_conv2d_grad_weight.default,
                              (grad, x.detach(), [3, 3], stride, padding, dilation, part, kernel))


@pytest.mark.parametrize("kernel", ["stock", pytest.param("cpu", marks=needs_kernels)])
def test_every_path_matches_the_oracle_forward_and_backward(kernel):
    for args, what in _samples(kernel):
        x, wk, w1, b, stride, padding, dilation, part, _ = args
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, wk, w1, b)]
        refs = [t.double().requires_grad_() if t is not None else None for t in (x, wk, w1, b)]
        out = ops.het_conv2d(*leaves, stride, padding, dilation, part, kernel)
        expected = oracle(*refs, tuple(stride), part, padding=tuple(padding), dilation=tuple(dilation))
        tol = 1e-5 if x.dtype == torch.float32 else 1e-12
        assert out.is_contiguous(memory_format=CL), f"{what}: the output is channels-last, got {out.stride()}"
        assert_agrees(out, expected, f"{kernel} {what} forward", tol)
        weight = torch.randn(expected.shape, dtype=torch.float64)
        (out * weight.to(out.dtype)).sum().backward()
        (expected * weight).sum().backward()
        for name, got, ref in zip(("input", "weight_kxk", "weight_1x1", "bias"), leaves, refs):
            if got is not None:
                assert_agrees(got.grad, ref.grad, f"{kernel} {what} gradient of {name}", 10 * tol)


def test_gradcheck_gradgradcheck_forward_mode_and_batched_gradients_in_float64():
    """PyTorch's numerical checks through the operator (the stock path computes float64): first
    and second derivatives, forward-mode AD and vmap over the backward (batched gradients)."""
    x, wk, w1, b = _layer(M=4, N=4, P=2, batch=1, size=(4, 3), dtype=torch.float64)
    geometries = (_geometry(part=2), _geometry(stride=(2, 1), part=2), _geometry(dilation=(1, 2), part=2))
    for first, geometry in zip((True, False, False), geometries):
        inputs = tuple(t.clone().requires_grad_() for t in (x, wk, w1, b))

        def f(*t, geometry=geometry):
            return ops.het_conv2d(*t, *geometry)

        assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True, check_batched_grad=True)
        # batched second derivatives run one backward per vector (the legacy vmap of gradgradcheck
        # does not use the operator's vmap rule): checked on one geometry, which is minutes otherwise
        assert torch.autograd.gradgradcheck(f, inputs, check_fwd_over_rev=True, check_batched_grad=first)


def _reference_grads(x, wk, w1, b, geometry, u):
    """First and second derivatives by the float64 stock path: the gradient penalty
    ``sum(u * dL/dx)`` with ``L = sum(w * y)``."""
    leaves = [t.double().detach().requires_grad_() if t is not None else None for t in (x, wk, w1, b)]
    y = ops.het_conv2d(*leaves, *geometry, impl="stock")
    gx, = torch.autograd.grad((y * y).sum(), leaves[0], create_graph=True)
    penalty = (gx * u.double()).sum()
    return [g for g in torch.autograd.grad(penalty, [t for t in leaves if t is not None])]


@needs_kernels
@pytest.mark.parametrize("stride", [(1, 1), (2, 2)])
def test_double_backward_through_the_cpu_kernels(stride):
    """A gradient penalty (double backward) through the compiled kernels gives the float64 stock
    path's second derivatives: nothing dropped."""
    x, wk, w1, b = _layer(M=32, N=32, P=4, batch=2, size=(6, 6))
    geometry = _geometry(stride=stride)
    u = torch.randn_like(x)
    leaves = [t.clone().requires_grad_() for t in (x, wk, w1, b)]
    y = ops.het_conv2d(*leaves, *geometry, impl="cpu")
    gx, = torch.autograd.grad((y * y).sum(), leaves[0], create_graph=True)
    got = torch.autograd.grad((gx * u).sum(), leaves)
    expected = _reference_grads(x, wk, w1, b, geometry, u)
    for name, g, e in zip(("input", "weight_kxk", "weight_1x1", "bias"), got, expected):
        assert_agrees(g, e, f"second derivative, {name}", 1e-4)


@needs_kernels
def test_forward_mode_ad_through_the_cpu_kernels():
    x, wk, w1, b = _layer(M=32, N=32, P=4)
    tangents = [torch.randn_like(t) for t in (x, wk, w1, b)]
    with fwAD.dual_level():
        duals = [fwAD.make_dual(t, d) for t, d in zip((x, wk, w1, b), tangents)]
        jvp = fwAD.unpack_dual(ops.het_conv2d(*duals, *_geometry(), impl="cpu")).tangent
    assert jvp is not None, "forward-mode AD gave no tangent"
    # The operator is bilinear: its derivative along (dx, dw) is y(dx, w) + y(x, dw) + db.
    d = [t.double() for t in tangents]
    p = [t.double() for t in (x, wk, w1, b)]
    expected = oracle(d[0], p[1], p[2], d[3], 1, 4) + oracle(p[0], d[1], d[2], None, 1, 4)
    assert_agrees(jvp, expected, "forward-mode tangent", 1e-5)


@needs_kernels
def test_batched_gradients_and_vectorized_jacobians_through_the_cpu_kernels():
    x, wk, w1, _ = _layer(M=8, N=8, P=2, batch=1, size=(3, 3), bias=False)
    geometry = _geometry(part=2)
    xr = x.clone().requires_grad_()
    y = ops.het_conv2d(xr, wk, w1, None, *geometry, impl="cpu")
    basis = torch.eye(y.numel()).view(-1, *y.shape)
    rows, = torch.autograd.grad(y, xr, basis, is_grads_batched=True)
    jacobian = torch.autograd.functional.jacobian(
        lambda t: ops.het_conv2d(t, wk, w1, None, *geometry, impl="cpu"), x, vectorize=True)
    expected = torch.autograd.functional.jacobian(
        lambda t: oracle(t, wk.double(), w1.double(), None, 1, 2), x.double())
    assert_agrees(rows.view(expected.shape), expected, "is_grads_batched rows", 1e-5)
    assert_agrees(jacobian, expected, "jacobian(vectorize=True)", 1e-5)


def test_vmap_over_the_operator_folds_the_batch_or_loops():
    x, wk, w1, b = _layer(M=8, N=8, P=2, batch=2, size=(4, 4))
    geometry = _geometry(part=2)
    xs = torch.randn(3, *x.shape)
    got = torch.func.vmap(lambda t: ops.het_conv2d(t, wk, w1, b, *geometry))(xs)
    for i in range(3):
        torch.testing.assert_close(got[i], ops.het_conv2d(xs[i], wk, w1, b, *geometry))
    w1s = torch.randn(3, *w1.shape)
    got = torch.func.vmap(lambda w: ops.het_conv2d(x, wk, w, b, *geometry))(w1s)
    for i in range(3):
        torch.testing.assert_close(got[i], ops.het_conv2d(x, wk, w1s[i], b, *geometry))


class _Relayout(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that hand back each saved tensor in another memory layout and, optionally,
    through another dtype (as offloading and compression hooks do)."""

    def __init__(self, dtype=None):
        def pack(t):
            if t.dim() == 4:
                t = t.contiguous() if t.is_contiguous(memory_format=CL) and not t.is_contiguous() else \
                    t.contiguous(memory_format=CL)
            return t if dtype is None else (t.to(dtype), t.dtype)

        def unpack(packed):
            return packed if dtype is None else packed[0].to(packed[1])

        super().__init__(pack, unpack)


@pytest.mark.parametrize("kernel", ["stock", pytest.param("cpu", marks=needs_kernels)])
@pytest.mark.parametrize("hooks", ["layout", "float64", "save_on_cpu"])
def test_saved_tensor_hooks_of_any_layout_and_dtype(kernel, hooks):
    """The backward reads its saved tensors as the hooks return them: another memory layout or a
    round trip through another dtype gives the same gradients (the kernels once trusted the saved
    input's layout: wrong weight gradients)."""
    for input_cl in (False, True):
        x, wk, w1, b = _layer(M=32, N=32, P=4, size=(7, 6))
        if input_cl:
            x = x.contiguous(memory_format=CL)
        plain = [t.clone().requires_grad_() for t in (x, wk, w1, b)]
        ops.het_conv2d(*plain, *_geometry(), impl=kernel).pow(2).sum().backward()
        hooked = [t.clone().requires_grad_() for t in (x, wk, w1, b)]
        context = {"layout": _Relayout(), "float64": _Relayout(torch.float64),
                   "save_on_cpu": torch.autograd.graph.save_on_cpu()}[hooks]
        with context:
            out = ops.het_conv2d(*hooked, *_geometry(), impl=kernel)
        out.pow(2).sum().backward()
        for name, a, e in zip(("input", "weight_kxk", "weight_1x1", "bias"), hooked, plain):
            # (another layout may sum in another order: float32 rounding, not a different answer)
            assert_agrees(a.grad, e.grad, f"{hooks} hooks, input channels-last {input_cl}: {name} gradient", 1e-5)


def test_mixed_dtypes_and_bad_arguments_are_value_errors_before_any_work():
    x, wk, w1, b = _layer()
    g = _geometry()
    for args, match in (
        ((x, wk.double(), w1, b, *g), "weight_kxk has dtype torch.float64, expected input's dtype"),
        ((x, wk, w1, b.half(), *g), "bias has dtype"),
        ((x, wk, w1[:, :-1], b, *g), r"weight_1x1 has shape \(24, 11\), expected \(24, 12\)"),
        ((x, wk, w1, b, [0, 1], *g[1:]), r"stride \(\[0, 1\]\) must be two ints >= 1"),
        ((x, wk, w1, b, g[0], [2, 1], g[2], g[3]), "padding"),
        ((x, wk, w1, b, *g[:3], 5), "divisible by part"),
        ((x, wk[:, :, :2], w1, b, *g), "odd sizes"),
        ((x, wk, w1, b, *g, "gpu"), "impl \\('gpu'\\) must be one of"),
        ((x.double(), wk.double(), w1.double(), None, *g, "cpu"), "impl 'cpu' cannot compute this call: dtype"),
        ((x, wk, w1, b, g[0], [2, 2], [2, 2], g[3], "cpu"), "impl 'cpu' cannot compute this call: padding"),
        ((x, wk, w1, b, *g, "triton") if not ops.triton_kernel("cpu") else (x, wk, w1, b, *g, "gpu"),
         "impl 'triton' cannot compute" if not ops.triton_kernel("cpu") else "must be one of"),
    ):
        with pytest.raises(ValueError, match=match):
            ops.het_conv2d(*args)


@needs_kernels
def test_the_compiled_entry_points_check_their_arguments():
    """Every bad call into the compiled operators raises a RuntimeError naming what is wrong; none
    crashes the interpreter (they used to take raw pointers)."""
    x, wk, w1, _ = _layer()
    empty = torch.empty(0)
    kernels = torch.ops.sparse_hetconv
    for call, match in (
        (lambda: kernels._cpu_forward(x.double(), wk, w1, empty, [1, 1], 4), "input must be float32"),
        (lambda: kernels._cpu_forward(x[0], wk, w1, empty, [1, 1], 4), "input has shape"),
        (lambda: kernels._cpu_forward(x, wk, w1[:, 1:], empty, [1, 1], 4), "weight_1x1 has shape"),
        (lambda: kernels._cpu_forward(x, wk, w1, torch.ones(3), [1, 1], 4), "bias has shape"),
        (lambda: kernels._cpu_forward(x, wk, w1, empty, [0, 1], 4), "stride"),
        (lambda: kernels._cpu_forward(x, wk, w1, empty, [1, 1], 1), "part"),
        (lambda: kernels._cpu_forward(x, torch.randn(24, 4, 9, 9), w1, empty, [1, 1], 4), "up to 7x7"),
        (lambda: kernels._cpu_forward(x, torch.randn(24, 4, 2, 3), w1, empty, [1, 1], 4), "odd size"),
        (lambda: kernels._cpu_forward(x, wk, w1, empty, [1, 1], 5), "divisible"),
        (lambda: kernels._cpu_grad_input(torch.randn(2, 24, 5, 5), wk, w1, list(x.shape), 4), "grad has shape"),
        (lambda: kernels._cpu_grad_input(torch.randn(2, 24, 6, 5), wk, w1, [2, 16, 6], 4), "input_size"),
        (lambda: kernels._cpu_grad_weight(torch.randn(2, 24, 6, 5), x, torch.randn(24, 15), [3, 3], [1, 1], 4),
         "dense has shape"),
        (lambda: kernels._cpu_grad_weight(torch.randn(2, 24, 3, 5), x, torch.randn(24, 16), [3, 3], [1, 1], 4),
         "grad has shape"),
    ):
        with pytest.raises(RuntimeError, match=match):
            call()


@needs_kernels
def test_an_unknown_isa_cap_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("SPARSE_HETCONV_MAX_ISA", "avx3")
    with pytest.raises(RuntimeError, match=r"SPARSE_HETCONV_MAX_ISA \('avx3'\) must be one of avx512, avx2, none"):
        ops.het_conv2d(*_layer(), *_geometry())
    monkeypatch.setenv("SPARSE_HETCONV_MAX_ISA", "none")
    assert ops.cpu_kernel() is None and "SPARSE_HETCONV_MAX_ISA=none" in ops.kernel_info()
    torch.testing.assert_close(ops.het_conv2d(*_layer(), *_geometry()),
                               ops.het_conv2d(*_layer(), *_geometry(), impl="stock"))


@pytest.mark.parametrize("kernel", ["stock", pytest.param("cpu", marks=needs_kernels)])
@pytest.mark.parametrize("size, stride", [((0, 5), (2, 2)), ((4, 0), (1, 1)), ((1, 1), (2, 2)), ((0, 0), (3, 3))])
def test_empty_and_tiny_inputs_give_a_result(kernel, size, stride):
    """An empty spatial input at stride >= 2 once crashed the interpreter (the Python and C++ sides
    rounded the output size differently); every size gives the output size formula's shape (an
    empty input an empty output, where nn.Conv2d refuses it)."""
    for batch in (0, 2):
        x, wk, w1, b = _layer(batch=batch, size=size)
        leaves = [t.clone().requires_grad_() for t in (x, wk, w1, b)]
        out = ops.het_conv2d(*leaves, *_geometry(stride=stride), impl=kernel)
        expected = (batch, 24) + tuple((n - 1) // s + 1 if n else 0 for n, s in zip(size, stride))
        assert out.shape == expected, f"{size} stride {stride}: {tuple(out.shape)} vs {expected}"
        out.sum().backward()
        assert all(t.grad is not None and t.grad.shape == t.shape for t in leaves)
        assert leaves[0].grad.abs().sum() == 0 or out.numel() > 0


@pytest.mark.parametrize("kernel", ["stock", pytest.param("cpu", marks=needs_kernels)])
def test_nonfinite_weights_follow_the_definition(kernel):
    """An inf in an off-centre k x k weight: the forward multiplies the zero padding by it (NaN at
    the border, as F.conv2d does) in every tiling, and the input gradient has no term for taps
    outside the output (finite there), as the definition's."""
    for M, N, P, size in ((32, 64, 4, (9, 12)), (16, 16, 4, (5, 5)), (64, 64, 32, (6, 6))):
        x, wk, w1, _ = _layer(M=M, N=N, P=P, size=size, bias=False)
        wk[0, 0, 0, 0] = float("inf")
        w1[1, 2] = float("-inf")
        leaves = [t.clone().requires_grad_() for t in (x, wk, w1)]
        out = ops.het_conv2d(*leaves, None, *_geometry(part=P), impl=kernel)
        refs = [t.double().requires_grad_() for t in (x, wk, w1)]
        expected = nn.functional.conv2d(refs[0], _dense(refs[1], refs[2], P), None, 1, 1)
        assert_agrees(out, expected, f"{kernel} {M}x{N}/{P} forward with inf weights", 1e-5)
        grad = torch.randn(out.shape)
        out.backward(grad)
        expected.backward(grad.double())
        assert_agrees(leaves[0].grad, refs[0].grad, f"{kernel} {M}x{N}/{P} input gradient with inf weights", 1e-4)


def _dense(wk, w1, part):
    """The dense k x k weight of a HetConv (1 x 1 kernels at the centre tap, zeros elsewhere), for
    the definition's convolution with non-finite weights (its missing kernels are exact zeros)."""
    n, m = wk.shape[0] // part, wk.shape[1]
    cout, cin, k = wk.shape[0], m * part, wk.shape[2]
    dense = torch.zeros(cout, cin, k, k, dtype=wk.dtype)
    for j in range(cout):
        g = j // n
        dense[j, g * m:(g + 1) * m] = wk[j]
        others = [c for c in range(cin) if not g * m <= c < (g + 1) * m]
        dense[j, others, k // 2, k // 2] = w1[j]
    return dense


def test_flop_counter_counts_the_kernels_that_exist():
    x, wk, w1, b = _layer(M=16, N=24, P=4, batch=2, size=(6, 5))
    macs = 2 * 6 * 5 * 24 * (4 * 9 + 12)
    with FlopCounterMode(display=False) as counter:
        ops.het_conv2d(x, wk, w1, b, *_geometry())
    assert counter.get_total_flops() == 2 * macs
    xr = x.clone().requires_grad_()
    wr = wk.clone().requires_grad_()
    with FlopCounterMode(display=False) as counter:
        ops.het_conv2d(xr, wr, w1, None, *_geometry()).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * macs, "forward, input gradient, weight gradient"


@pytest.mark.parametrize("training", [False, True])
def test_export_and_compile_keep_the_operator(training):
    """torch.export (eval and train) records the operator; torch.compile(fullgraph=True) runs it with
    no graph break and matches eager, forward and backward."""
    torch.manual_seed(0)
    layer = SparseHetConv2d(16, 32, 4, bias=True).train(training)
    x = torch.randn(2, 16, 6, 6)
    program = torch.export.export(layer, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "sparse_hetconv.het_conv2d.default" in targets, f"exported {targets}"
    torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-5, atol=1e-5)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if training else "inductor")
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(compiled(xc), layer(xe), rtol=1e-5, atol=1e-5)
    if training:
        compiled(xc).sum().backward()
        layer(xe).sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("nm") is None, reason="needs binutils")
@needs_kernels
def test_wide_instructions_live_only_in_their_own_builds():
    """The AVX-512 and AVX2 kernels are compiled with their own flags into one library: no function
    the linker may share between builds (a global or weak symbol) uses ymm or zmm registers, so a
    CPU without AVX-512 never reaches an AVX-512 instruction outside the kernels it selected."""
    library, = (str(p) for p in Path(sparse_hetconv.__file__).parent.glob("_C*.so"))
    symbols = subprocess.run(["nm", "--defined-only", library], capture_output=True, text=True, check=True).stdout
    shared = {line.split()[2] for line in symbols.splitlines()
              if len(line.split()) == 3 and line.split()[1] in "TWVi" and not line.split()[2].startswith("shc_kernels")}
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True,
                             check=True).stdout
    wide, current = set(), None
    for line in listing.splitlines():
        if line.endswith(">:"):
            current = line.split("<", 1)[1][:-2]
        elif current in shared and ("%zmm" in line or "%ymm" in line):
            wide.add(current)
    assert not wide, f"shared functions with wide instructions: {sorted(wide)[:5]}"
    assert shared, "no global symbol found: is the library stripped?"
