"""The ``fused`` backend (the operator ``torch.ops.sparse_hetconv.het_conv2d`` with its CPU kernels,
sparse_hetconv/csrc/kernels.h) against the oracle.

The kernels have several tilings (lanes over filters, "OV", with one group per tile or several
under lane masks; its row-wise "direct" variant, whose side taps run by input column; lanes over
groups, "GVO", with 1-4 filters per tile, in one or several ranges per group; the side taps' weight
gradient with lanes over a group's input channels, "CT"), two builds (AVX-512 and AVX2) and two
ways of sharing the work between threads (pixels, or filter chunks when the pixels are few). Each
is swept here over random shapes against the float64 definition oracle, forward and every
gradient, in float32 (tolerance: 2e-5 of the magnitude of the terms each value sums); the calls the
kernels do not compute (float64, 3-D) run elsewhere (the operator's stock formulation, or
``blocked``). Dispatch paths (grad modes, memory formats, precisions, call history) are swept for
every backend, this one included, by tests/integration/test_dispatch.py. No timing is asserted.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_agrees, oracle
from sparse_hetconv import SparseHetConv2d, SparseHetConv3d, autotune, ops
from sparse_hetconv.functional import het_conv2d

CL = torch.channels_last
pytestmark = [
    pytest.mark.skipif(ops.cpu_kernel() is None, reason=ops.kernel_info()),
    pytest.mark.usefixtures("fresh_choices"),
]
TOL = 2e-5


@contextlib.contextmanager
def build(name: str):
    """Run the CPU kernels of instruction set ``name`` (``avx512`` or ``avx2``) inside the block."""
    saved = os.environ.get("SPARSE_HETCONV_MAX_ISA")
    os.environ["SPARSE_HETCONV_MAX_ISA"] = name
    try:
        assert ops.cpu_kernel() == name, f"this CPU does not run the {name} kernels"
        yield name
    finally:
        if saved is None:
            del os.environ["SPARSE_HETCONV_MAX_ISA"]
        else:
            os.environ["SPARSE_HETCONV_MAX_ISA"] = saved


def _isas() -> list[str]:
    """The builds this CPU runs (the widest first)."""
    found = []
    for name in ("avx512", "avx2"):
        with build_cap(name):
            if ops.cpu_kernel() == name:
                found.append(name)
    return found


@contextlib.contextmanager
def build_cap(name: str):
    saved = os.environ.get("SPARSE_HETCONV_MAX_ISA")
    os.environ["SPARSE_HETCONV_MAX_ISA"] = name
    try:
        yield
    finally:
        if saved is None:
            del os.environ["SPARSE_HETCONV_MAX_ISA"]
        else:
            os.environ["SPARSE_HETCONV_MAX_ISA"] = saved


def _scale(x, weight_kxk, weight_1x1, bias, stride, part):
    """The magnitude of the terms each output sums: the oracle of the absolute values."""
    return oracle(x.abs(), weight_kxk.abs(), weight_1x1.abs(), None if bias is None else bias.abs(), stride, part)


def check_against_oracle(M, N, P, k, stride, batch, size, bias, input_cl, weights_cl, seed, what):
    torch.manual_seed(seed)
    x64 = torch.randn((batch, M) + size, dtype=torch.float64)
    wk64 = torch.randn(N, M // P, k, k, dtype=torch.float64)
    w164 = torch.randn(N, M - M // P, dtype=torch.float64)
    b64 = torch.randn(N, dtype=torch.float64) if bias else None
    x = x64.float()
    wk = wk64.float()
    if input_cl:
        x = x.contiguous(memory_format=CL)
    if weights_cl:
        wk = wk.contiguous(memory_format=CL)
    leaves = [x.requires_grad_(), wk.requires_grad_(), w164.float().requires_grad_()]
    leaves.append(None if b64 is None else b64.float().requires_grad_())
    out = het_conv2d(*leaves, stride, P, backend="fused")
    ref_leaves = [t.clone().requires_grad_() for t in (x64, wk64, w164)] + [None if b64 is None else b64.clone()
                                                                             .requires_grad_()]
    expected = oracle(*ref_leaves, stride, P)
    assert out.is_contiguous(memory_format=CL) or out.numel() == 0, f"{what}: output strides {out.stride()}"
    scale = _scale(x64, wk64, w164, b64, stride, P)
    assert_agrees(out, expected, f"{what} forward", TOL, scale)
    if out.numel() == 0:
        return
    weight = torch.randn(expected.shape, dtype=torch.float64)
    (out * weight.float()).sum().backward()
    (expected * weight).sum().backward()
    for name, got, ref in zip(("input", "weight_kxk", "weight_1x1", "bias"), leaves, ref_leaves):
        if got is None:
            continue
        assert_agrees(got.grad, ref.grad, f"{what} gradient of {name}", 3 * TOL,
                      ref.grad.abs().amax() * torch.ones_like(ref.grad) / 10)


@st.composite
def layers(draw):
    """Shapes that reach every tiling: wide and narrow groups, P below and above the vector width,
    group counts that leave a partial vector, filter counts that leave a partial chunk."""
    part = draw(st.sampled_from([2, 3, 4, 8, 16, 20, 32, 48]))
    n = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16, 24, 32]) if part >= 16 else st.integers(1, 40))
    m = draw(st.sampled_from([1, 2, 4, 8]) if part >= 16 else st.integers(1, 24))
    k = draw(st.sampled_from([1, 3, 3, 5]))
    stride = draw(st.sampled_from([1, 1, 2]))
    batch = draw(st.sampled_from([1, 2, 3]))
    size = (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    return dict(M=m * part, N=n * part, P=part, k=k, stride=(stride, stride), batch=batch, size=size,
                bias=draw(st.booleans()), input_cl=draw(st.booleans()), weights_cl=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("isa", _isas())
@settings(max_examples=200 if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else 25, deadline=None)
@given(case=layers())
def test_matches_the_oracle_forward_and_backward(isa, case):
    with build(isa):
        check_against_oracle(**case, what=f"{isa} {case}")


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("case", [
    # (M, N, P, size, k): OV one group per tile (n a multiple of the vector) / several under masks
    (64, 128, 2, (6, 6), 3), (24, 40, 8, (5, 4), 3),
    # GVO: 1, 2, 3, 4 filters per tile, filters in ranges (n = 6, 8, 12), groups leaving part of a vector
    (32, 32, 32, (5, 5), 3), (64, 128, 32, (4, 4), 3), (48, 48, 16, (3, 5), 3), (64, 64, 16, (4, 4), 3),
    (96, 96, 16, (3, 3), 3), (128, 128, 16, (3, 3), 3), (96, 192, 16, (2, 3), 3), (40, 80, 20, (3, 3), 3),
    # direct (rows of >= 8 pixels at stride 1): groups of 8 / 16 / 32 filters, pairs of groups, k = 5
    (32, 64, 4, (3, 9), 3), (48, 48, 3, (4, 17), 3), (64, 128, 4, (2, 11), 3), (16, 64, 2, (5, 8), 5),
    (64, 64, 4, (9, 13), 5),
    # the side taps' weight gradient with lanes over channels: whole vectors, a masked last vector
    # with filters left over after tiles of three (or two) and 24 taps in blocks, a half vector
    (64, 64, 4, (6, 6), 3), (96, 40, 4, (5, 5), 5), (64, 64, 8, (4, 5), 3),
])
def test_each_tiling_matches_the_oracle(isa, case):
    M, N, P, size, k = case
    with build(isa):
        for stride in (1, 2):
            check_against_oracle(M, N, P, k, (stride, stride), 2, size, True, True, False, 0,
                                 f"{isa} {case} stride {stride}")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch, size", [(1, (2, 2)), (2, (9, 9)), (9, (16, 16))])
def test_every_split_of_the_work_between_threads(threads, batch, size):
    """Few pixels share out filter chunks, many pixels share out panels; the weight gradient sums
    per-thread partials when the chunks are few. Any thread count gives the oracle's numbers."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for M, N, P in ((64, 64, 2), (32, 64, 16)):
            check_against_oracle(M, N, P, 3, (1, 1), batch, size, True, True, True, 1, f"{threads} threads {M}x{N}/{P}")
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("dtype, autocast", [(torch.bfloat16, False), (torch.float16, False), (torch.float32, True)])
def test_reduced_precision_computes_in_float32_and_rounds(dtype, autocast):
    torch.manual_seed(0)
    layer = SparseHetConv2d(32, 32, 4, bias=True, backend="fused")
    x = torch.randn(2, 32, 5, 5)
    expected = oracle(x.double(), layer.weight_kxk.double(), layer.weight_1x1.double(), layer.bias.double(), 1, 4)
    if not autocast:
        layer, x = layer.to(dtype), x.to(dtype)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        out = layer(x)
    assert out.dtype == (torch.bfloat16 if autocast else dtype), f"output dtype {out.dtype}"
    assert layer.resolved_backend == "fused"
    assert_agrees(out.float(), expected, f"{dtype} autocast={autocast}", 2e-2)
    out.float().sum().backward()
    assert layer.weight_1x1.grad is not None and layer.weight_1x1.grad.dtype == layer.weight_1x1.dtype


def test_nonfinite_inputs_give_the_definitions_answer():
    """No kernel multiplies a missing weight: inf and NaN land where the definition puts them, in
    both tilings (a lane never sees another group's taps, not even 0 * inf)."""
    for M, N, P in ((16, 32, 4), (32, 32, 16), (24, 40, 8)):
        torch.manual_seed(P)
        x = torch.randn(2, M, 5, 5)
        x[0, 1, 2, 2], x[1, M - 1, 0, 4], x[1, M // 2, 3, 1] = float("inf"), float("-inf"), float("nan")
        wk, w1 = torch.randn(N, M // P, 3, 3), torch.randn(N, M - M // P)
        got = het_conv2d(x, wk, w1, None, 1, P, backend="fused")
        expected = oracle(x.double(), wk.double(), w1.double(), None, 1, P)
        assert_agrees(got, expected, f"{M}x{N}/{P} with inf and NaN", 1e-5)


def test_calls_it_does_not_compute_run_the_stock_formulation_or_blocked():
    """float64 is computed by the operator's stock formulation (still the operator); 3-D layers and
    torch.func transforms resolve to blocked; a meta tensor gets the fake kernel's shape."""
    layer = SparseHetConv2d(8, 8, 2, backend="fused", dtype=torch.float64)
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64)
    expected = oracle(x, layer.weight_kxk, layer.weight_1x1, None, 1, 2)
    assert_agrees(layer(x), expected, "float64 through the operator", 1e-12)
    assert layer.resolved_backend == "fused"
    layer3 = SparseHetConv3d(8, 8, 2, backend="fused")
    layer3(torch.randn(1, 8, 3, 3, 3))
    assert layer3.resolved_backend == "blocked", "3-D layers are computed by blocked"
    layer = SparseHetConv2d(8, 8, 2, backend="fused")
    params = dict(layer.named_parameters())
    grads = torch.func.grad(lambda p, t: torch.func.functional_call(layer, p, (t,)).sum())(params, x.float())
    assert layer.resolved_backend == "blocked", "torch.func.grad has no rule for custom operators: blocked"
    assert grads["weight_1x1"].shape == layer.weight_1x1.shape
    with torch.device("meta"):
        assert layer.to("meta")(torch.empty(1, 8, 4, 4)).shape == (1, 8, 4, 4)


def test_weights_written_any_way_are_read_on_the_next_call():
    """Nothing derived from the weights is kept between calls: fused optimizer steps, writes through
    ``.data`` and ``load_state_dict`` all show in the next no-grad call."""
    torch.manual_seed(0)
    layer = SparseHetConv2d(16, 16, 4, backend="fused").eval()
    x = torch.randn(2, 16, 5, 5)

    def agrees(what):
        with torch.no_grad():
            got = layer(x)
        expected = oracle(x.double(), layer.weight_kxk.double(), layer.weight_1x1.double(), None, 1, 4)
        assert_agrees(got, expected, what, 1e-5)

    agrees("first call")
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1, fused=True)
    layer(x).sum().backward()
    optimizer.step()
    agrees("after Adam(fused=True).step()")
    layer.weight_1x1.data.mul_(-2)
    agrees("after a write through .data")
    state = {k: torch.randn_like(v) for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)
    agrees("after load_state_dict")


def test_auto_picks_fused_only_where_a_timing_confirms_it():
    layer = SparseHetConv2d(64, 64, 4).eval()
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=CL)
    with torch.no_grad():
        layer(x)
    (backend, how), = autotune.choices().values()
    assert how in ("confirmed", "refuted"), f"a fused proposal is timed against dense in confirm mode, got {how}"
    assert backend == ("fused" if how == "confirmed" else "dense")
    with autotune.mode("model"):
        autotune.clear()
        assert autotune.choose(layer.pattern, x, False) == "fused"
        assert autotune.choose(layer.pattern, x.double(), False) != "fused", "the kernel computes float32"
        assert autotune.choose(layer.pattern, x.bfloat16(), False) != "fused", "oneDNN has bfloat16 kernels"


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dot", [True, False], ids=["in-place weights", "laid-out weights"])
def test_a_few_pixels_with_weights_in_place_or_laid_out(isa, dot):
    """Forwards of at most 64 output pixels whose k x k weights have contiguous input channels
    (channels-last, as the models keep them) read the weights where they lie (dot products over
    channels); NCHW weights are laid out as for any other call. Both routes give the oracle's numbers."""
    with build(isa):
        for M, N, P, size, k, stride in ((64, 128, 4, (4, 4), 3, 1), (48, 32, 16, (5, 3), 5, 2), (24, 24, 24, (2, 2), 3, 1),
                                         (96, 48, 3, (1, 1), 3, 1), (40, 80, 8, (3, 7), 3, 2)):
            check_against_oracle(M, N, P, k, (stride, stride), 2, size, True, False, dot, 3,
                                 f"{isa} dot={dot} {(M, N, P, size, k, stride)}")


def test_the_backends_command_says_which_kernels_this_install_has():
    """``python -m sparse_hetconv.backends`` (what ``make install`` runs last) prints one line: the
    CPU kernels this process runs, and no module is executed twice."""
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "sparse_hetconv.backends"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"sparse_hetconv CPU: {ops.cpu_kernel()} kernels;"), done.stdout
    assert len(done.stdout.strip().splitlines()) == 1 and "RuntimeWarning" not in done.stderr
