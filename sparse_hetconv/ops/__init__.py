"""The HetConv operator, registered with PyTorch: ``torch.ops.sparse_hetconv.het_conv2d`` and the two
operators of its backward, defined here once with their fake (meta) kernels, autograd (backward,
double backward and forward-mode), vmap and autocast rules (FLOP formulas:
:mod:`sparse_hetconv._flop_formulas`). docs/design.md §10 has the schemas.

``input`` is ``(B, M, H, W)``, ``weight_kxk`` ``(N, M/P, kh, kw)`` (odd sizes), ``weight_1x1`` the
compact ``(N, M - M/P)`` values (``(N, 0)`` when ``part`` is 1), ``0 <= padding <= dilation * (k //
2)``. The output is channels-last, in the input's dtype, of ``nn.Conv2d``'s size. ``impl`` picks the
code: ``"cpu"`` (the compiled kernels of ``csrc/``: float32, bfloat16 and float16 computed in
float32, ``padding = k // 2``, dilation 1, ``part >= 2``, kernels up to 7 x 7), ``"triton"`` (CUDA,
same geometry), ``"stock"`` (:mod:`sparse_hetconv.ops.stock`, anything) or ``"auto"`` (the compiled
kernel of the call's device where it computes the call, else stock); a named implementation that
cannot compute the call is a ``ValueError``. :func:`kernel_info` says which compiled kernels this
install has (``python -m sparse_hetconv.backends``).
"""

from __future__ import annotations

import importlib.machinery
import os
from pathlib import Path

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import stock

__all__ = ["IMPLS", "cpu_kernel", "het_conv2d", "het_conv2d_grad_input", "het_conv2d_grad_weight", "kernel_info",
           "triton_kernel"]

IMPLS = ("auto", "cpu", "triton", "stock")
_LOW = (torch.bfloat16, torch.float16)
_KERNEL_DTYPES = (torch.float32,) + _LOW


# -- the compiled CPU kernels ---------------------------------------------------------------------------
def _load_cpu_kernels() -> str | None:
    """Load the extension next to this file (its static initialisers register the ``_cpu_*``
    operators); the reason it is not there otherwise."""
    here = Path(__file__).resolve().parent.parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_C{suffix}"
        if path.is_file():
            try:
                torch.ops.load_library(str(path))
            except OSError as error:
                return f"{path.name} does not load ({error})"
            return None
    return ("this install has no compiled CPU kernels (the package was built without a C++ compiler or without "
            "torch's headers: pip install --no-build-isolation .)")


_CPU_MISSING = _load_cpu_kernels()


_ISA: dict[str, str] = {}


def cpu_kernel() -> str | None:
    """The CPU kernels this process runs: ``"avx512"`` or ``"avx2"``, or None (see :func:`kernel_info`).

    The widest instruction set the CPU reports, capped by ``SPARSE_HETCONV_MAX_ISA`` (``avx512``,
    ``avx2`` or ``none``; read on every eager call, any other value is a RuntimeError; graph capture
    reads the answer as it was when the package was imported).
    """
    if _CPU_MISSING is not None:
        return None
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return _AT_IMPORT
    cap = os.environ.get("SPARSE_HETCONV_MAX_ISA", "")
    isa = _ISA.get(cap)
    if isa is None:
        isa = _ISA[cap] = torch.ops.sparse_hetconv._cpu_kernel_isa()
    return None if isa.startswith("none") else isa


def _isa_at_import() -> str | None:
    try:
        return cpu_kernel()
    except RuntimeError:  # (a bad SPARSE_HETCONV_MAX_ISA: every eager call says so)
        return None


_AT_IMPORT = _isa_at_import()


def triton_kernel(device: torch.device | str = "cuda") -> bool:
    """Whether the Triton kernels run on ``device`` here (triton importable, and CUDA, or the
    interpreter on the CPU)."""
    from . import _triton

    return _triton.available(torch.device(device))


def kernel_info() -> str:
    """One line: which compiled kernels this install has, and why not where it has none."""
    if _CPU_MISSING is not None:
        cpu = f"CPU: none ({_CPU_MISSING})"
    else:
        isa = cpu_kernel() or torch.ops.sparse_hetconv._cpu_kernel_isa()
        cpu = f"CPU: {isa} kernels" if not isa.startswith("none") else f"CPU: none ({isa[6:]})"
    if not torch.cuda.is_available():
        gpu = "CUDA: no device"
    else:
        gpu = "CUDA: Triton kernels" if triton_kernel("cuda") else "CUDA: none (triton is not importable)"
    return f"sparse_hetconv {cpu}; {gpu}; stock PyTorch operations elsewhere"


# -- schemas --------------------------------------------------------------------------------------------
_LIB = torch.library.Library("sparse_hetconv", "FRAGMENT")
_GEOMETRY = "int[2] stride, int[2] padding, int[2] dilation, int part, str impl='auto'"
_LIB.define(f"het_conv2d(Tensor input, Tensor weight_kxk, Tensor weight_1x1, Tensor? bias, {_GEOMETRY}) -> Tensor")
_LIB.define(f"het_conv2d_grad_input(Tensor grad, Tensor weight_kxk, Tensor weight_1x1, SymInt[4] input_size, "
            f"{_GEOMETRY}) -> Tensor")
_LIB.define(f"het_conv2d_grad_weight(Tensor grad, Tensor input, int[2] kernel_size, {_GEOMETRY}) -> (Tensor, Tensor)")
_OPS = torch.ops.sparse_hetconv


def het_conv2d(input, weight_kxk, weight_1x1, bias, stride, padding, dilation, part, impl="auto") -> Tensor:
    """``torch.ops.sparse_hetconv.het_conv2d`` (see the module docstring)."""
    return _OPS.het_conv2d(input, weight_kxk, weight_1x1, bias, list(stride), list(padding), list(dilation), part,
                           impl)


def het_conv2d_grad_input(grad, weight_kxk, weight_1x1, input_size, stride, padding, dilation, part, impl="auto"):
    """The input gradient of :func:`het_conv2d` (a HetConv of the transposed layer)."""
    return _OPS.het_conv2d_grad_input(grad, weight_kxk, weight_1x1, list(input_size), list(stride), list(padding),
                                      list(dilation), part, impl)


def het_conv2d_grad_weight(grad, input, kernel_size, stride, padding, dilation, part, impl="auto"):
    """The gradients of ``weight_kxk`` and ``weight_1x1`` of :func:`het_conv2d`."""
    return _OPS.het_conv2d_grad_weight(grad, input, list(kernel_size), list(stride), list(padding), list(dilation),
                                       part, impl)


# -- argument checks (shared by the fake and the real kernels) ------------------------------------------
def _check(input: Tensor, weight_kxk: Tensor, weight_1x1: Tensor, bias: Tensor | None, stride, padding, dilation,
           part: int, impl: str, input_name: str = "input") -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl ({impl!r}) must be one of {IMPLS}")
    if isinstance(part, bool) or not isinstance(part, int) or part < 1:
        raise ValueError(f"part ({part!r}) must be an int >= 1")
    if input.dim() != 4 or weight_kxk.dim() != 4:
        raise ValueError(f"het_conv2d expects 4-D {input_name} and weight_kxk, got shapes {tuple(input.shape)} "
                         f"and {tuple(weight_kxk.shape)}")
    cin, cout, (kh, kw) = input.shape[1], weight_kxk.shape[0], weight_kxk.shape[2:]
    if cin % part or cout % part:
        raise ValueError(f"channels ({cin} in, {cout} out) must be divisible by part ({part})")
    if weight_kxk.shape[1] != cin // part:
        raise ValueError(f"weight_kxk has shape {tuple(weight_kxk.shape)}, expected ({cout}, {cin // part}, kh, kw) "
                         f"for {cin} input channels and part {part}")
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"weight_kxk has kernel size {(kh, kw)}, expected odd sizes (a centre tap for the 1x1 part)")
    if tuple(weight_1x1.shape) != (cout, cin - cin // part):
        raise ValueError(f"weight_1x1 has shape {tuple(weight_1x1.shape)}, expected ({cout}, {cin - cin // part})")
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({cout},)")
    for name, value in (("stride", stride), ("dilation", dilation)):
        if len(value) != 2 or any(v < 1 for v in value):
            raise ValueError(f"{name} ({list(value)}) must be two ints >= 1")
    if len(padding) != 2 or any(not 0 <= p <= d * (k // 2) for p, d, k in zip(padding, dilation, (kh, kw))):
        raise ValueError(f"padding ({list(padding)}) must be two ints in [0, dilation * (k // 2)] = "
                         f"[0, {[d * (k // 2) for d, k in zip(dilation, (kh, kw))]}]: the 1x1 part reads the centre tap")
    extent = [d * (k - 1) + 1 - 2 * p for k, p, d in zip((kh, kw), padding, dilation)]
    if any(n > 0 and n < e for n, e in zip(input.shape[2:], extent)):
        raise ValueError(f"{input_name} has spatial size {tuple(input.shape[2:])}, smaller than the kernel's padded "
                         f"extent {tuple(extent)}")
    for name, t in (("weight_kxk", weight_kxk), ("weight_1x1", weight_1x1), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != input.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, expected {input_name}'s dtype ({input.dtype})")
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device}, expected {input_name}'s device ({input.device})")


def _out_hw(size, kernel_size, stride, padding, dilation) -> tuple:
    return tuple(stock.out_size(s, k, st, p, d) for s, k, st, p, d in zip(size, kernel_size, stride, padding, dilation))


# -- which code computes a call -------------------------------------------------------------------------
def _select(impl: str, input: Tensor, weight_kxk: Tensor, padding, dilation, part: int) -> str:
    """``"cpu"``, ``"triton"`` or ``"stock"`` for a checked call (a named one that cannot: ValueError)."""
    if impl == "stock":
        return "stock"
    if impl == "auto":
        # Triton on CUDA only: on the CPU its interpreter (TRITON_INTERPRET=1) runs the kernels for
        # testing, thousands of times slower than the stock formulation; it is asked for by name.
        names = ("cpu", "triton") if input.device.type != "cpu" else ("cpu",)
        for name in names:
            if _cannot(name, input, weight_kxk, padding, dilation, part) is None:
                return name
        return "stock"
    reason = _cannot(impl, input, weight_kxk, padding, dilation, part)
    if reason is not None:
        raise ValueError(f"impl {impl!r} cannot compute this call: {reason}")
    return impl


def _cannot(impl: str, input: Tensor, weight_kxk: Tensor, padding, dilation, part: int) -> str | None:
    """Why the compiled kernels ``impl`` cannot compute this call (None if they can)."""
    kh, kw = weight_kxk.shape[2:]
    device = input.device
    dtypes = _KERNEL_DTYPES
    if impl == "triton":
        from . import _triton

        if not _triton.available(device):
            return (f"{device} (Triton runs on CUDA, on the CPU only under TRITON_INTERPRET=1, and needs the "
                    "triton package)")
        dtypes += (torch.float64,) if device.type == "cpu" else ()
    elif device.type != "cpu":
        return f"a {device.type} tensor (they run on the CPU)"
    elif cpu_kernel() is None:
        return kernel_info()
    if input.dtype not in dtypes:
        return f"dtype {input.dtype} (they compute {', '.join(str(d)[6:] for d in dtypes)})"
    if tuple(dilation) != (1, 1) or tuple(padding) != (kh // 2, kw // 2):
        return f"padding {list(padding)} and dilation {list(dilation)} (they compute padding k // 2, dilation 1)"
    if impl == "cpu" and part < 2:
        return "part 1 (a standard convolution)"
    if impl == "cpu" and kh * kw > 49:
        return f"kernel {kh}x{kw} (they compute up to 7x7)"
    return None


def _in_float32(low: torch.dtype | None, *tensors):
    return [t if t is None or low is None else t.float() for t in tensors]


def _forward(input, weight_kxk, weight_1x1, bias, stride, padding, dilation, part, impl="auto"):
    _check(input, weight_kxk, weight_1x1, bias, stride, padding, dilation, part, impl)
    which = _select(impl, input, weight_kxk, padding, dilation, part)
    if which == "stock":
        return stock.forward(input, weight_kxk, weight_1x1, bias, stride, padding, dilation, part)
    if which == "triton":
        from . import _triton

        return _triton.forward(input, weight_kxk, weight_1x1, bias, tuple(stride), part)
    low = input.dtype if input.dtype in _LOW else None
    x, wk, w1, b = _in_float32(low, input, weight_kxk, weight_1x1, bias)
    out = _OPS._cpu_forward(x, wk, w1, b if b is not None else x.new_empty(0), list(stride), part)
    return out if low is None else out.to(low)


def _grad_input(grad, weight_kxk, weight_1x1, input_size, stride, padding, dilation, part, impl="auto"):
    meta = torch.empty((0,) + tuple(input_size[1:]), dtype=grad.dtype, device=grad.device)
    _check(meta, weight_kxk, weight_1x1, None, stride, padding, dilation, part, impl)
    which = _select(impl, grad, weight_kxk, padding, dilation, part)
    if which == "triton" and tuple(stride) == (1, 1):
        from . import _triton

        return _triton.grad_input(grad, weight_kxk, weight_1x1, part)
    if which == "cpu" and tuple(stride) == (1, 1):
        low = grad.dtype if grad.dtype in _LOW else None
        g, wk, w1 = _in_float32(low, grad, weight_kxk, weight_1x1)
        out = _OPS._cpu_grad_input(g, wk, w1, list(input_size), part)
        if out.dim() == 4:  # (an empty (0,) tensor: a weight is not finite; the stock form below)
            return out if low is None else out.to(low)
    return stock.grad_input(grad, weight_kxk, weight_1x1, input_size, stride, padding, dilation, part)


def _grad_weight(grad, input, kernel_size, stride, padding, dilation, part, impl="auto"):
    shape = (grad.shape[1], input.shape[1] // max(part, 1)) + tuple(kernel_size)
    if part < 1 or input.shape[1] % part:
        raise ValueError(f"input channels ({input.shape[1]}) must be divisible by part ({part})")
    wk = torch.empty(shape, dtype=input.dtype, device=input.device)
    w1 = torch.empty((grad.shape[1], input.shape[1] - input.shape[1] // part), dtype=input.dtype, device=input.device)
    _check(input, wk, w1, None, stride, padding, dilation, part, impl)
    if grad.dtype != input.dtype:
        raise ValueError(f"grad has dtype {grad.dtype}, expected input's dtype ({input.dtype})")
    if _select(impl, input, wk, padding, dilation, part) != "cpu":
        return stock.grad_weight(grad, input, kernel_size, stride, padding, dilation, part)
    low = input.dtype if input.dtype in _LOW else None
    g, x = _in_float32(low, grad, input)
    samples = stock.centre(x, g.shape[2:], kernel_size, stride, padding, dilation)
    dense = stock.rows(g).t() @ stock.rows(samples)  # every entry is an existing weight's gradient
    grad_kxk, grad_1x1 = _OPS._cpu_grad_weight(g, x, dense, list(kernel_size), list(stride), part)
    return (grad_kxk, grad_1x1) if low is None else (grad_kxk.to(low), grad_1x1.to(low))


# One implementation per operator for every device: each picks its code from the call (_select).
for _name, _fn in (("het_conv2d", _forward), ("het_conv2d_grad_input", _grad_input),
                   ("het_conv2d_grad_weight", _grad_weight)):
    _LIB.impl(_name, _fn, "CompositeExplicitAutograd")


@torch.library.register_fake("sparse_hetconv::het_conv2d", lib=_LIB)
def _forward_fake(input, weight_kxk, weight_1x1, bias, stride, padding, dilation, part, impl="auto"):
    _check(input, weight_kxk, weight_1x1, bias, stride, padding, dilation, part, impl)
    hw = _out_hw(input.shape[2:], weight_kxk.shape[2:], stride, padding, dilation)
    return input.new_empty((input.shape[0], weight_kxk.shape[0]) + hw).contiguous(memory_format=stock.CL)


@torch.library.register_fake("sparse_hetconv::het_conv2d_grad_input", lib=_LIB)
def _grad_input_fake(grad, weight_kxk, weight_1x1, input_size, stride, padding, dilation, part, impl="auto"):
    return grad.new_empty(list(input_size)).contiguous(memory_format=stock.CL)


@torch.library.register_fake("sparse_hetconv::het_conv2d_grad_weight", lib=_LIB)
def _grad_weight_fake(grad, input, kernel_size, stride, padding, dilation, part, impl="auto"):
    cout, cin = grad.shape[1], input.shape[1]
    return (input.new_empty((cout, cin // part) + tuple(kernel_size)), input.new_empty((cout, cin - cin // part)))


# -- autograd: backward, double backward and forward mode -----------------------------------------------
def _register_autograd(name: str, n_tensors: int, setup, backward, jvp) -> None:
    """An autograd kernel for ``sparse_hetconv::name`` with a backward and a forward-mode formula.

    ``torch.library.register_autograd`` takes a backward only (forward-mode AD through it silently
    yields no tangent), so this is the same construction with ``jvp``: an ``autograd.Function``
    whose forward runs the operator below the autograd key. ``n_tensors``: the leading tensor
    arguments (the rest are geometry).
    """
    op = getattr(_OPS, name).default

    def run_below(keyset, args):
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    function = type(f"HetConv_{name}", (torch.autograd.Function,), {
        "forward": staticmethod(lambda keyset, *args: run_below(keyset, args)),
        "setup_context": staticmethod(lambda ctx, inputs, output: setup(ctx, inputs[1:], output)),
        "backward": staticmethod(lambda ctx, *grads: (None,) + tuple(backward(ctx, *grads))),
        "jvp": staticmethod(lambda ctx, _, *tangents: jvp(ctx, *tangents[:n_tensors])),
    })

    def kernel(keyset, *args):
        tensors = [t for t in args[:n_tensors] if isinstance(t, Tensor)]
        recorded = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        dual = fwAD._current_level >= 0 and any(fwAD.unpack_dual(t).tangent is not None for t in tensors)
        if recorded or dual:
            first = args[0]
            if first.dim() == 4 and first.device.type == "cpu" and not first.is_contiguous(memory_format=stock.CL):
                # The kernels read channels-last: one copy, which the forward reads and the backward
                # keeps (not the NCHW tensor, which the backward would copy again).
                args = (first.contiguous(memory_format=stock.CL),) + args[1:]
            return function.apply(keyset, *args)
        return run_below(keyset, args)

    _LIB.impl(name, kernel, "Autograd", with_keyset=True)


def _restored(ctx, saved):
    """The saved tensors as the operator computed with them: a saved-tensor hook may hand back
    another dtype or memory layout (``save_on_cpu``, compression)."""
    return [t if t is None or t.dtype == dtype else t.to(dtype) for t, dtype in zip(saved, ctx.dtypes)]


def _no_autocast(device_type: str):
    # ``loss.backward()`` inside an autocast region: the backward computes in the saved dtypes.
    return torch.autocast(device_type, enabled=False)


def _setup_forward(ctx, inputs, output):
    input, weight_kxk, weight_1x1, bias, *geometry = inputs
    ctx.geometry, ctx.has_bias = geometry, bias is not None
    ctx.dtypes = (input.dtype, weight_kxk.dtype, weight_1x1.dtype)
    ctx.save_for_backward(input, weight_kxk, weight_1x1)
    ctx.save_for_forward(input, weight_kxk, weight_1x1)


def _backward_forward(ctx, grad):
    input, weight_kxk, weight_1x1 = _restored(ctx, ctx.saved_tensors)
    need = ctx.needs_input_grad[1:]
    grad_input = grad_kxk = grad_1x1 = grad_bias = None
    with _no_autocast(grad.device.type):
        if need[0]:
            grad_input = _OPS.het_conv2d_grad_input(grad, weight_kxk, weight_1x1, list(input.shape), *ctx.geometry)
        if need[1] or need[2]:
            grad_kxk, grad_1x1 = _OPS.het_conv2d_grad_weight(grad, input, list(weight_kxk.shape[2:]), *ctx.geometry)
        if need[3] and ctx.has_bias:
            grad_bias = grad.sum((0, 2, 3))
    return (grad_input, grad_kxk if need[1] else None, grad_1x1 if need[2] else None, grad_bias) + (None,) * 5


def _jvp_forward(ctx, d_input, d_kxk, d_1x1, d_bias):
    input, weight_kxk, weight_1x1 = ctx.saved_tensors
    out = None
    if d_input is not None:
        out = _OPS.het_conv2d(d_input, weight_kxk, weight_1x1, None, *ctx.geometry)
    if d_kxk is not None or d_1x1 is not None:
        dk = d_kxk if d_kxk is not None else torch.zeros_like(weight_kxk)
        d1 = d_1x1 if d_1x1 is not None else torch.zeros_like(weight_1x1)
        term = _OPS.het_conv2d(input, dk, d1, None, *ctx.geometry)
        out = term if out is None else out + term
    if d_bias is not None:
        term = d_bias.view(1, -1, 1, 1)
        out = term.expand(out.shape if out is not None else (input.shape[0], -1) + _out_hw(
            input.shape[2:], weight_kxk.shape[2:], *ctx.geometry[:3])) if out is None else out + term
    return out


def _setup_grad_input(ctx, inputs, output):
    grad, weight_kxk, weight_1x1, input_size, *geometry = inputs
    ctx.geometry, ctx.input_size = geometry, list(input_size)
    ctx.dtypes = (grad.dtype, weight_kxk.dtype, weight_1x1.dtype)
    ctx.save_for_backward(grad, weight_kxk, weight_1x1)
    ctx.save_for_forward(grad, weight_kxk, weight_1x1)


def _backward_grad_input(ctx, u):
    # grad_input = A(w)^T g is linear in g and in w: <u, A(w)^T g> = <A(w) u, g>.
    grad, weight_kxk, weight_1x1 = _restored(ctx, ctx.saved_tensors)
    need = ctx.needs_input_grad[1:]
    d_grad = d_kxk = d_1x1 = None
    with _no_autocast(u.device.type):
        if need[0]:
            d_grad = _OPS.het_conv2d(u, weight_kxk, weight_1x1, None, *ctx.geometry)
        if need[1] or need[2]:
            d_kxk, d_1x1 = _OPS.het_conv2d_grad_weight(grad, u, list(weight_kxk.shape[2:]), *ctx.geometry)
    return (d_grad, d_kxk if need[1] else None, d_1x1 if need[2] else None) + (None,) * 6


def _jvp_grad_input(ctx, d_grad, d_kxk, d_1x1):
    grad, weight_kxk, weight_1x1 = ctx.saved_tensors
    out = None
    if d_grad is not None:
        out = _OPS.het_conv2d_grad_input(d_grad, weight_kxk, weight_1x1, ctx.input_size, *ctx.geometry)
    if d_kxk is not None or d_1x1 is not None:
        dk = d_kxk if d_kxk is not None else torch.zeros_like(weight_kxk)
        d1 = d_1x1 if d_1x1 is not None else torch.zeros_like(weight_1x1)
        term = _OPS.het_conv2d_grad_input(grad, dk, d1, ctx.input_size, *ctx.geometry)
        out = term if out is None else out + term
    return out


def _setup_grad_weight(ctx, inputs, output):
    grad, input, kernel_size, *geometry = inputs
    ctx.geometry, ctx.kernel_size = geometry, list(kernel_size)
    ctx.dtypes = (grad.dtype, input.dtype)
    ctx.save_for_backward(grad, input)
    ctx.save_for_forward(grad, input)


def _backward_grad_weight(ctx, u_kxk, u_1x1):
    # (grad_kxk, grad_1x1) = B(g, x) is bilinear: <u, B(g, x)> = <g, het_conv2d(x; u)>.
    grad, input = _restored(ctx, ctx.saved_tensors)
    need = ctx.needs_input_grad[1:]
    cout, cin, part = grad.shape[1], input.shape[1], ctx.geometry[3]
    if u_kxk is None:
        u_kxk = grad.new_zeros((cout, cin // part, *ctx.kernel_size))
    if u_1x1 is None:
        u_1x1 = grad.new_zeros((cout, cin - cin // part))
    d_grad = d_input = None
    with _no_autocast(grad.device.type):
        if need[0]:
            d_grad = _OPS.het_conv2d(input, u_kxk, u_1x1, None, *ctx.geometry)
        if need[1]:
            d_input = _OPS.het_conv2d_grad_input(grad, u_kxk, u_1x1, list(input.shape), *ctx.geometry)
    return (d_grad, d_input) + (None,) * 6


def _jvp_grad_weight(ctx, d_grad, d_input):
    grad, input = ctx.saved_tensors
    outs = []
    if d_grad is not None:
        outs.append(_OPS.het_conv2d_grad_weight(d_grad, input, ctx.kernel_size, *ctx.geometry))
    if d_input is not None:
        outs.append(_OPS.het_conv2d_grad_weight(grad, d_input, ctx.kernel_size, *ctx.geometry))
    return tuple(sum(parts) for parts in zip(*outs))


_register_autograd("het_conv2d", 4, _setup_forward, _backward_forward, _jvp_forward)
_register_autograd("het_conv2d_grad_input", 3, _setup_grad_input, _backward_grad_input, _jvp_grad_input)
_register_autograd("het_conv2d_grad_weight", 2, _setup_grad_weight, _backward_grad_weight, _jvp_grad_weight)


# -- vmap (torch.func.vmap, batched gradients, vectorized Jacobians) ------------------------------------
def _register_vmap(name: str, n_tensors: int, fold: int | None) -> None:
    """A vmap rule: the vmapped dimension folded into the batch where only argument ``fold`` (a
    tensor whose dim 0 is the batch, the others unbatched) carries it, else one call per entry."""
    op = getattr(_OPS, name)

    def rule(info, in_dims, *args):
        dims = in_dims[:n_tensors]
        batched = [i for i, d in enumerate(dims) if d is not None]
        if fold is not None and batched == [fold]:
            t = args[fold].movedim(dims[fold], 0)
            merged = t.reshape((-1,) + t.shape[2:])
            rest = list(args)
            rest[fold] = merged
            if name == "het_conv2d_grad_input":  # input_size follows the folded batch
                rest[3] = [merged.shape[0]] + list(rest[3][1:])
            out = op(*rest)
            return out.view((t.shape[0], t.shape[1]) + out.shape[1:]), 0
        outs = []
        for i in range(info.batch_size):
            call = [a.select(d, i) if d is not None else a for a, d in zip(args[:n_tensors], dims)]
            outs.append(op(*call, *args[n_tensors:]))
        if isinstance(outs[0], tuple):
            return tuple(torch.stack(parts) for parts in zip(*outs)), (0,) * len(outs[0])
        return torch.stack(outs), 0

    torch.library.register_vmap(f"sparse_hetconv::{name}", rule, lib=_LIB)


_register_vmap("het_conv2d", 4, fold=0)
_register_vmap("het_conv2d_grad_input", 3, fold=0)
_register_vmap("het_conv2d_grad_weight", 2, fold=None)


# -- autocast -------------------------------------------------------------------------------------------
def _register_autocast(device_type: str) -> None:
    """Cast the floating tensors (not float64) to the autocast region's dtype, read at call time as
    ``F.conv2d`` does (``torch.library.register_autocast`` casts to one fixed dtype), then run the
    operator with autocast off."""
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def cast(t, dtype):
        if t is not None and t.is_floating_point() and t.device.type == device_type and t.dtype != torch.float64:
            return t.to(dtype)
        return t

    def kernel(keyset, input, weight_kxk, weight_1x1, bias, *geometry):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return _OPS.het_conv2d(cast(input, dtype), cast(weight_kxk, dtype), cast(weight_1x1, dtype),
                                   cast(bias, dtype), *geometry)

    _LIB.impl("het_conv2d", kernel, key, with_keyset=True)


for _device in ("cpu", "cuda"):
    _register_autocast(_device)
