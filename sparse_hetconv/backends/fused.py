"""``fused``: the whole 2-D layer as one compiled CPU kernel over only the kernels that exist.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. The CPU counterpart of
``triton`` (docs/design.md §11): with the k x k kernels' centre taps folded into the 1 x 1 part
(§4), group g's outputs are ONE implicit GEMM over the ``M`` channels at the centre pixel and the
``(k^2 - 1) m`` off-centre taps of block g, so every multiply-accumulate is one of the layer's
``N (k^2 m + M - m)`` useful ones per output pixel: no zero, no mask, no N x M matrix kept. The
kernel (``csrc/hetconv_cpu.cpp``, compiled on first use, :mod:`._cpu_build`) keeps a tile of
output pixels x filters in vector registers and reads the input straight from its channels-last
memory; the weights are laid out for it on every call, from the parameters as they are then
(nothing derived is cached, so no update of the weights, however written, can be missed).

* **Backward.** The weight gradient is the same sum read the other way (one reduction over the
  output pixels, into the same layout, then split into ``weight_kxk``'s and the compact
  ``weight_1x1``'s gradients: the gradient of a missing kernel is never formed). The input
  gradient at stride 1 is the forward kernel on the transposed layer, itself a HetConv (``N``
  inputs, ``M`` filters, the same ``P``, taps flipped); at stride > 1 it is the grouped transposed
  convolution plus the compact transposed 1 x 1 product, both stock.
* **Layout.** NHWC: an input that is not channels-last is copied to channels-last once per call
  (the output is channels-last, so in a network only the first layer pays it).
* **Precision.** float32. bfloat16 and float16 calls (and float32 under CPU autocast) are computed
  in float32 and rounded to their precision, as the stock kernels accumulate; gradients reach
  the parameters in their own dtype.
* **Where it does not run** -- float64 (and other dtypes), 3-D layers, other devices, tensors
  without plain storage (fake, meta, ``torch.func``-wrapped, subclasses) and graph capture
  (``torch.compile``, ``torch.export``, ``torch.jit.trace``: the kernel is not an operator they can
  record) -- the call is computed by ``blocked``, in the call's own precision, and
  ``layer.resolved_backend`` says so. ``backend="auto"`` only chooses ``fused`` where it runs and a
  timing on this machine confirms it (:mod:`sparse_hetconv.autotune`).

Run ``python -m sparse_hetconv.backends --build`` to compile ahead of first use.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from ..pattern import HetConvPattern
from . import _cpu_build, blocked
from ._common import eager_tensor, reduced_precision

__all__ = ["Config", "available", "config", "het_conv", "lanes", "runs", "unavailable_reason"]

CL = torch.channels_last
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_TAPS = 49  # kernels up to 7 x 7 (the kernel tabulates at most 64 taps per pixel)


def available() -> bool:
    """Whether the compiled kernels load here (built on first call; see :mod:`._cpu_build`)."""
    return _cpu_build.load() is not None


def lanes() -> int:
    """float32 lanes per vector of the kernels this process runs (16: AVX-512, 8: AVX2; 0 if none)."""
    lib = _cpu_build.load()
    return 0 if lib is None else lib.lanes


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return _cpu_build.reason()


def runs(input: Tensor, weights: tuple, pattern: HetConvPattern) -> bool:
    """Whether the kernel computes this call (else ``blocked`` does): a 2-D eager CPU call outside
    graph capture, on tensors with plain storage, in float32 / bfloat16 / float16, kernels built."""
    if pattern.dims != 2 or pattern.kernel_numel > MAX_TAPS or input.device.type != "cpu":
        return False
    if input.dtype not in _KERNEL_DTYPES:
        return False
    if not eager_tensor(input):
        return False
    for t in weights:
        if t is not None and (t.device.type != "cpu" or t.dtype not in _KERNEL_DTYPES or not eager_tensor(t)):
            return False
    return available()


class Config:
    """How the OV kernel tiles one pass: ``nv`` vectors of output lanes per tile, ``mr`` output
    pixels per tile (``rw`` input channels per weight-gradient tile), ``pp`` pixels per panel (the
    run of pixels whose input addresses are tabulated)."""

    __slots__ = ("nv", "mr", "pp", "rw")

    def __init__(self, nv: int, mr: int, pp: int = 256, rw: int | None = None) -> None:
        self.nv, self.mr, self.pp = nv, mr, pp
        self.rw = rw if rw is not None else mr

    def __repr__(self) -> str:
        return f"Config(nv={self.nv}, mr={self.mr}, pp={self.pp}, rw={self.rw})"


def config(width: int, lanes: int) -> Config:
    """The OV tiling for ``width`` lanes that belong together (a group's filters, or all of them for
    the centre rows alone): as many vectors per tile as divide ``width`` (up to four on AVX-512, two
    on AVX2). Register budget: AVX-512's 32 vector registers hold 24 accumulators, AVX2's 16 hold 12."""
    wide = lanes == 16
    if wide and width % (4 * lanes) == 0:
        return Config(4, 6, rw=6)
    if width % (2 * lanes) == 0:
        return Config(2, 12 if wide else 6)
    return Config(1, 12)


DIRECT = True  # whether the direct tiling is used where it applies (a switch for the benchmarks)


def gv_applies(block_in: int, block_out: int, part: int, lanes: int) -> bool:
    """Whether a layer runs with lanes over groups (GVO) rather than over filters (OV).

    GVO needs groups enough to fill a vector (``P >= lanes``) and a filter count per group its
    tiles take (1, 2, 3, 6 or a multiple of 4; csrc: gvo_filters). It wins where a group's filters
    would leave most OV lanes idle under the group masks: measured on VGG-16's layer shapes at
    batch 32 (the development machine of docs/performance.md, both tilings interleaved), 0.30-0.79x
    OV's time at ``n <= 4``, 0.87-1.12x at ``n = 8`` (better from ``P = 64``), 1.07-1.32x at ``n = 16``.
    """
    n = block_out
    if part < lanes or not (n in (1, 2, 3, 6) or n % 4 == 0):
        return False
    return n <= 4 or (n <= 8 and part >= 64)


# -- calls into the library -------------------------------------------------------------------------
def _i64(*values: int):
    return (ctypes.c_int64 * len(values))(*values)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _Pass:
    """One application of the kernels: the layer ``cin -> cout`` (the forward layer, or the
    transposed one of the input gradient) at one input size, and how it is tiled."""

    def __init__(self, lib, batch, height, width, cin, cout, part, kernel, stride) -> None:
        self.lib, self.part, self.cin, self.cout = lib, part, cin, cout
        self.dims = (batch, height, width, cin, cout, part, kernel[0], kernel[1], stride[0], stride[1])
        self.gv = gv_applies(cin // part, cout // part, part, lib.lanes)
        # OV panels: centre and side rows (one group per tile), or the centre rows alone (GV).
        self.cfg = config(cout if self.gv else cout // part, lib.lanes)
        self.geo = self.geometry(centre=True, side=not self.gv)
        # Groups of whole vectors at stride 1: the side taps by input column (csrc: direct_tile).
        self.direct = not self.gv and DIRECT and bool(lib.shc_direct_applies(self.geo))

    def geometry(self, centre: bool, side: bool):
        return _i64(*self.dims, int(centre), int(side))

    def pack(self, weight_kxk: Tensor, weight_1x1: Tensor, transposed: bool, threads: int):
        """The weights laid out for this pass: OV panels, or GVO centre panels and side taps."""
        lib, sk, s1 = self.lib, _i64(*weight_kxk.stride()), _i64(*weight_1x1.stride())
        if self.direct:
            panels = torch.empty(lib.shc_direct_panel_floats(self.geo), dtype=torch.float32)
            lib.shc_direct_pack(_ptr(weight_kxk), sk, _ptr(weight_1x1), s1, self.geo, int(transposed), _ptr(panels),
                                threads)
            return panels, None
        if not self.gv:
            panels = torch.empty(lib.shc_panel_floats(self.geo, self.cfg.nv), dtype=torch.float32)
            lib.shc_pack(_ptr(weight_kxk), sk, _ptr(weight_1x1), s1, self.geo, self.cfg.nv, int(transposed),
                         _ptr(panels), threads)
            return panels, None
        panels = torch.empty(lib.shc_gvo_panel_floats(self.geo), dtype=torch.float32)
        lib.shc_gvo_pack(_ptr(weight_kxk), sk, _ptr(weight_1x1), s1, self.geo, int(transposed), _ptr(panels), threads)
        kh, kw = self.dims[6:8]
        kt = torch.empty((kh * kw - 1) * self.cin * (self.cout // self.part), dtype=torch.float32)
        lib.shc_gv_pack(_ptr(weight_kxk), sk, self.geo, int(transposed), _ptr(kt))
        return panels, kt

    def transposed_input(self, x: Tensor, channels: int, threads: int) -> Tensor:
        """``x`` (NHWC) in the GV layout: per pixel, channel ``g*b + c'`` at ``c'*P + g`` (``x`` itself
        when ``b = 1``)."""
        if channels == self.part:
            return x
        out = torch.empty(x.shape, dtype=torch.float32, memory_format=CL)
        pixels = x.numel() // channels if channels else 0
        self.lib.shc_gv_transpose(_ptr(x), pixels, channels, self.part, _ptr(out), threads)
        return out

    def run(self, x: Tensor, weights, bias: Tensor | None, out_shape, threads: int, xt: Tensor | None = None
            ) -> Tensor:
        lib, cfg = self.lib, self.cfg
        panels, kt = weights
        y = torch.empty(out_shape, dtype=torch.float32, memory_format=CL)
        if self.direct:
            lib.shc_direct_forward(_ptr(x), _ptr(panels), _ptr(bias), _ptr(y), self.geo, threads)
            return y
        if not self.gv:
            lib.shc_forward(_ptr(x), _ptr(panels), _ptr(bias), _ptr(y), self.geo, cfg.nv, cfg.mr, cfg.pp, 0, threads)
            return y
        if xt is None:
            xt = self.transposed_input(x, self.cin, threads)
        lib.shc_gvo_forward(_ptr(x), _ptr(xt), _ptr(panels), _ptr(kt), _ptr(bias), _ptr(y), self.geo, cfg.pp, threads)
        return y


DOT_PIXELS = 64  # output pixels up to which the forward reads the weights in place (csrc: shc_dot_forward)


def _dot_applies(out_shape, weight_kxk: Tensor, weight_1x1: Tensor) -> bool:
    """A forward of at most :data:`DOT_PIXELS` output pixels whose k x k weights have contiguous
    input channels (channels-last, as the models keep them) and whose compact rows are contiguous."""
    pixels = out_shape[0] * out_shape[2] * out_shape[3]
    return (0 < pixels <= DOT_PIXELS and (weight_kxk.size(1) == 1 or weight_kxk.stride(1) == 1)
            and (weight_1x1.size(1) <= 1 or weight_1x1.stride(1) == 1))


def _out_shape(input_shape, cout: int, stride) -> tuple:
    batch, _, height, width = input_shape
    return (batch, cout, (height - 1) // stride[0] + 1, (width - 1) // stride[1] + 1)


class _FusedHetConv(torch.autograd.Function):
    """float32 tensors in, float32 out; the inputs are the layer's (any strides)."""

    @staticmethod
    def forward(ctx, x, weight_kxk, weight_1x1, bias, stride, part):
        lib = _cpu_build.load()
        threads = torch.get_num_threads()
        batch, cin, height, width = x.shape
        cout, kernel = weight_kxk.shape[0], tuple(weight_kxk.shape[2:])
        xc = x.contiguous(memory_format=CL)
        out_shape = _out_shape(x.shape, cout, stride)
        bias = None if bias is None else bias.contiguous()
        if _dot_applies(out_shape, weight_kxk, weight_1x1):
            # A few output pixels: the weights are read where they lie, nothing laid out.
            y = torch.empty(out_shape, dtype=torch.float32, memory_format=CL)
            geo = _i64(batch, height, width, cin, cout, part, kernel[0], kernel[1], stride[0], stride[1], 1, 1)
            lib.shc_dot_forward(_ptr(xc), _ptr(weight_kxk), _i64(*weight_kxk.stride()), _ptr(weight_1x1),
                                _i64(*weight_1x1.stride()), _ptr(bias), _ptr(y), geo, threads)
        else:
            layer = _Pass(lib, batch, height, width, cin, cout, part, kernel, stride)
            y = layer.run(xc, layer.pack(weight_kxk, weight_1x1, False, threads), bias, out_shape, threads)
        ctx.save_for_backward(xc, weight_kxk, weight_1x1)
        ctx.stride, ctx.part, ctx.has_bias = tuple(stride), part, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        # A backward run inside an autocast region (``loss.backward()`` in the ``with`` block) would
        # cast its stock products (dY^T X, the strided input gradient) to bfloat16, which the
        # kernels would then read as float32.
        with torch.autocast("cpu", enabled=False):
            return _FusedHetConv._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        xc, weight_kxk, weight_1x1 = ctx.saved_tensors
        stride, part = ctx.stride, ctx.part
        lib = _cpu_build.load()
        threads = torch.get_num_threads()
        need = ctx.needs_input_grad
        grad_x = grad_kxk = grad_1x1 = grad_bias = None
        dy = grad.contiguous(memory_format=CL)
        empty = dy.numel() == 0 or xc.numel() == 0
        dyt = None
        if need[0]:
            if empty:
                grad_x = torch.zeros(xc.shape, dtype=torch.float32).contiguous(memory_format=CL)
            else:
                grad_x, dyt = _grad_input(lib, dy, xc, weight_kxk, weight_1x1, stride, part, threads)
        if need[1] or need[2]:
            if empty:
                grad_kxk, grad_1x1 = torch.zeros_like(weight_kxk), torch.zeros_like(weight_1x1)
            else:
                grad_kxk, grad_1x1 = _grad_weights(lib, dy, xc, weight_kxk, weight_1x1, stride, part, threads, dyt)
        if need[3] and ctx.has_bias:
            grad_bias = dy.sum((0, 2, 3))
        return grad_x, grad_kxk if need[1] else None, grad_1x1 if need[2] else None, grad_bias, None, None


def _grad_input(lib, dy: Tensor, x: Tensor, weight_kxk: Tensor, weight_1x1: Tensor, stride, part, threads):
    """The input gradient, and ``dy`` in the GV layout if it was formed on the way (else None)."""
    batch, cin, height, width = x.shape
    cout, kernel = weight_kxk.shape[0], tuple(weight_kxk.shape[2:])
    if tuple(stride) == (1, 1):
        # The transposed layer: cout inputs, cin filters, the same part, stride 1.
        layer = _Pass(lib, batch, height, width, cout, cin, part, kernel, (1, 1))
        dyt = layer.transposed_input(dy, cout, threads) if layer.gv else None
        return layer.run(dy, layer.pack(weight_kxk, weight_1x1, True, threads), None, x.shape, threads, dyt), dyt
    from .triton_conv import _blocked, _transposed_1x1  # stock products (this import needs no triton)

    padding = tuple(k // 2 for k in kernel)
    out = torch.nn.grad.conv2d_input(x.shape, weight_kxk, dy, stride, padding, 1, part)
    pointwise = _blocked(_rows(dy), _transposed_1x1(weight_1x1, part), part)
    out[:, :, ::stride[0], ::stride[1]] += pointwise.view(batch, dy.shape[2], dy.shape[3], cin).permute(0, 3, 1, 2)
    return out, None


def _grad_weights(lib, dy: Tensor, x: Tensor, weight_kxk: Tensor, weight_1x1: Tensor, stride, part, threads,
                  dyt: Tensor | None = None):
    batch, cin, height, width = x.shape
    cout, kernel = weight_kxk.shape[0], tuple(weight_kxk.shape[2:])
    layer = _Pass(lib, batch, height, width, cin, cout, part, kernel, stride)
    grad_kxk = torch.empty(weight_kxk.shape, dtype=torch.float32)
    grad_1x1 = torch.empty(weight_1x1.shape, dtype=torch.float32)
    # The centre rows (every 1 x 1 kernel and every centre tap): one dense product over the output
    # pixels, dY^T X (BLAS), whose every entry is the gradient of an existing weight.
    dense = _rows(dy).t() @ _rows(x[:, :, ::stride[0], ::stride[1]])
    lib.shc_unpack_centre(_ptr(dense.contiguous()), layer.geo, _ptr(grad_kxk), _ptr(grad_1x1), threads)
    if kernel == (1, 1):
        return grad_kxk, grad_1x1
    if layer.gv:
        xt = layer.transposed_input(x, cin, threads)
        if dyt is None:
            dyt = layer.transposed_input(dy, cout, threads)
        total = (kernel[0] * kernel[1] - 1) * cin * (cout // part)
        gkt = torch.empty(total, dtype=torch.float32)
        work = torch.empty(total * threads, dtype=torch.float32)
        lib.shc_gv_wgrad(_ptr(xt), _ptr(dyt), _ptr(gkt), layer.geo, layer.cfg.pp, _ptr(work), threads)
        lib.shc_gv_unpack(_ptr(gkt), layer.geo, _ptr(grad_kxk))
        return grad_kxk, grad_1x1
    side = layer.geometry(centre=False, side=True)
    cfg = layer.cfg
    grad = torch.empty(lib.shc_panel_floats(side, cfg.nv), dtype=torch.float32)
    work = None
    if lib.shc_wgrad_needs_work(side, cfg.nv, threads):
        work = torch.empty(grad.numel() * threads, dtype=torch.float32)
    lib.shc_wgrad(_ptr(x), _ptr(dy), _ptr(grad), side, cfg.nv, cfg.rw, cfg.pp, _ptr(work), threads)
    lib.shc_unpack_side(_ptr(grad), side, cfg.nv, _ptr(grad_kxk), threads)
    return grad_kxk, grad_1x1


def _rows(x: Tensor) -> Tensor:
    """``(pixels, channels)`` rows of an NCHW-shaped tensor (a view when it is channels-last)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def het_conv(input: Tensor, weight_kxk: Tensor, weight_1x1: Tensor, bias: Tensor | None,
             stride: tuple[int, ...], pattern: HetConvPattern, grad: bool) -> Tensor:
    if not runs(input, (weight_kxk, weight_1x1, bias), pattern):
        return blocked.het_conv(input, weight_kxk, weight_1x1, bias, stride, pattern, grad)
    low = reduced_precision(input)
    if low is None and input.dtype != torch.float32:
        low = input.dtype
    with torch.autocast("cpu", enabled=False):
        args = [None if t is None else t.float() for t in (input, weight_kxk, weight_1x1, bias)]
        out = _FusedHetConv.apply(*args, tuple(stride), pattern.part)
    return out if low is None else out.to(low)
