"""The Triton kernels of the ``triton`` backend and their launchers (imported on first use).

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. Two kernels:

* :func:`hetconv_forward` — the whole layer as one channels-last implicit GEMM. A program owns a
  tile of output pixels x filters of one group ``g``; its reduction runs over the ``k*k*m`` taps
  of block ``g`` and then over the ``M - m`` existing 1 x 1 kernels, read straight from the
  compact ``weight_1x1`` in two contiguous ranges: channels ``[0, g*m)`` are compact columns
  ``[0, g*m)``, channels ``[(g+1)*m, M)`` are compact columns ``[g*m, M - m)``. No index tensor,
  no scatter, no multiplication by zeros. Bias in the epilogue; the output is written once.
* :func:`grad_weight_1x1` — the compact 1 x 1 weight gradient
  ``dW1[group g rows, compact cols] = dY_g^T X[:, two ranges]`` over the output pixels (the input
  sampled at the stride), split over pixel chunks into a float32 workspace that is summed after.

Both accumulate in float32 (float64 for float64 tensors, which only the interpreter runs). Under
``TRITON_INTERPRET=1`` each kernel has ONE small tile config (autotuning would run every config in
NumPy) and bfloat16 tiles are widened to float32 before ``tl.dot``: the interpreter's bfloat16
``tl.dot`` returns garbage (measured with triton 3.9.0), while its float32 one is exact.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["INTERPRET", "hetconv_forward", "grad_weight_1x1"]

# Triton itself decides at decoration time whether ``@triton.jit`` builds interpreted kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


def _config(pix: int, n: int, k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_PIX": pix, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)


if INTERPRET:
    _FORWARD_CONFIGS = [_config(64, 16, 16, 1, 1)]
    _WGRAD_CONFIGS = [_config(64, 16, 16, 1, 1)]
else:
    # Large tiles for the early VGG layers (many pixels), narrow ones for deep layers with few
    # pixels or small groups; BLOCK_K 16 for blocks of fewer than 32 channels.
    _FORWARD_CONFIGS = [
        _config(128, 64, 32, 4, 3),
        _config(128, 128, 32, 8, 3),
        _config(64, 64, 32, 4, 4),
        _config(128, 64, 64, 8, 3),
        _config(64, 32, 32, 4, 3),
        _config(32, 64, 64, 4, 3),
        _config(64, 32, 16, 4, 2),
        _config(32, 16, 16, 2, 2),
    ]
    # Here BLOCK_N is the filters and BLOCK_K the compact columns of a dW1 tile; BLOCK_PIX the
    # pixels reduced per step.
    _WGRAD_CONFIGS = [
        _config(64, 64, 64, 4, 3),
        _config(32, 64, 64, 4, 4),
        _config(64, 32, 64, 4, 3),
        _config(64, 128, 64, 8, 3),
        _config(32, 32, 32, 4, 2),
        _config(32, 16, 16, 2, 2),
    ]


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(max(int(x), 1)))


def _prune_forward(configs, named_args, **kwargs):
    """Drop tiles wider than the group's filters or the block's channels (pure waste)."""
    n, m = _pow2(named_args["NB"]), _pow2(named_args["MB"])
    pixels = _pow2(named_args["NPIX"])
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= n and c.kwargs["BLOCK_K"] <= max(m, 32)
            and c.kwargs["BLOCK_PIX"] <= pixels]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_PIX"] * c.kwargs["BLOCK_N"])]


def _prune_wgrad(configs, named_args, **kwargs):
    n, cols = _pow2(named_args["NB"]), _pow2(named_args["CIN"] - named_args["MB"])
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= n and c.kwargs["BLOCK_K"] <= cols]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.autotune(configs=_FORWARD_CONFIGS, key=["NPIX", "H", "W", "CIN", "COUT", "MB", "NB", "KH", "KW",
                                                "STRIDE_H", "STRIDE_W", "HAS_1X1", "PRECISION"],
                 prune_configs_by={"early_config_prune": _prune_forward})
@triton.jit
def _forward_kernel(
    x, wk, w1, bias, y,
    NPIX, H, W, HO, WO, CIN, COUT, MB, NB,
    sxb, sxh, sxw, sxc,
    skn, skc, skh, skw,
    s1n, s1c,
    syb, syh, syw, syc,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    HAS_1X1: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_F64: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_PIX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_pix = tl.program_id(0)
    pid_n = tl.program_id(1)
    tiles_n = tl.cdiv(NB, BLOCK_N)
    g = pid_n // tiles_n
    offs_p = pid_pix * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
    p_mask = offs_p < NPIX
    wo = (offs_p % WO).to(tl.int64)  # int64 offsets: one image may exceed 2**31 elements
    rest = offs_p // WO
    ho = (rest % HO).to(tl.int64)
    b = (rest // HO).to(tl.int64)
    offs_j = (pid_n % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    j_mask = offs_j < NB
    j = g * NB + offs_j
    offs_k = tl.arange(0, BLOCK_K)
    if ACC_F64:
        acc = tl.zeros((BLOCK_PIX, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_PIX, BLOCK_N), dtype=tl.float32)
    x_b = x + b * sxb

    # k x k part: the taps of block g (input channels [g*m, (g+1)*m)), padding k // 2. One flat
    # loop over (tap, channel chunk), so that the compiler pipelines loads across taps too.
    chunks = tl.cdiv(MB, BLOCK_K)
    for step in range(0, KH * KW * chunks):
        tap = step // chunks
        c = (step - tap * chunks) * BLOCK_K + offs_k
        c_mask = c < MB
        kh = tap // KW
        kw = tap - kh * KW
        ih = ho * STRIDE_H - KH // 2 + kh
        iw = wo * STRIDE_W - KW // 2 + kw
        valid = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load((x_b + ih * sxh + iw * sxw)[:, None] + (g * MB + c)[None, :] * sxc,
                    mask=valid[:, None] & c_mask[None, :], other=0.0)
        w = tl.load(wk + j[None, :] * skn + c[:, None] * skc + kh * skh + kw * skw,
                    mask=c_mask[:, None] & j_mask[None, :], other=0.0)
        acc = _mma(a, w, acc, UPCAST, PRECISION)

    if HAS_1X1:
        # 1 x 1 part at the k x k centre, i.e. the input sampled at the stride.
        rows = x_b + (ho * STRIDE_H) * sxh + (wo * STRIDE_W) * sxw
        w_rows = w1 + j[None, :] * s1n
        # Channels [0, g*m) are compact columns [0, g*m).
        before = g * MB
        for c0 in range(0, before, BLOCK_K):
            c = c0 + offs_k
            c_mask = c < before
            a = tl.load(rows[:, None] + c[None, :] * sxc, mask=p_mask[:, None] & c_mask[None, :], other=0.0)
            w = tl.load(w_rows + c[:, None] * s1c, mask=c_mask[:, None] & j_mask[None, :], other=0.0)
            acc = _mma(a, w, acc, UPCAST, PRECISION)
        # Channels [(g+1)*m, M) are compact columns [g*m, M - m).
        after = CIN - before - MB
        for c0 in range(0, after, BLOCK_K):
            c = c0 + offs_k
            c_mask = c < after
            a = tl.load(rows[:, None] + (before + MB + c)[None, :] * sxc,
                        mask=p_mask[:, None] & c_mask[None, :], other=0.0)
            w = tl.load(w_rows + (before + c)[:, None] * s1c, mask=c_mask[:, None] & j_mask[None, :], other=0.0)
            acc = _mma(a, w, acc, UPCAST, PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias + j, mask=j_mask, other=0.0).to(acc.dtype)[None, :]
    out = y + b * syb + ho * syh + wo * syw
    tl.store(out[:, None] + j[None, :] * syc, acc.to(y.dtype.element_ty), mask=p_mask[:, None] & j_mask[None, :])


@triton.autotune(configs=_WGRAD_CONFIGS, key=["NPIX", "CIN", "COUT", "MB", "NB", "SPLIT", "STRIDE_H", "STRIDE_W",
                                              "PRECISION"],
                 prune_configs_by={"early_config_prune": _prune_wgrad})
@triton.jit
def _wgrad_kernel(
    dy, x, ws,
    NPIX, HO, WO, CIN, COUT, MB, NB, SPLIT,
    sdb, sdh, sdw, sdc,
    sxb, sxh, sxw, sxc,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, ACC_F64: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_PIX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    split = tl.program_id(2)
    tiles_n = tl.cdiv(NB, BLOCK_N)
    g = pid_n // tiles_n
    offs_j = (pid_n % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    j_mask = offs_j < NB
    j = g * NB + offs_j
    width = CIN - MB
    cc = pid_c * BLOCK_K + tl.arange(0, BLOCK_K)
    c_mask = cc < width
    channel = tl.where(cc < g * MB, cc, cc + MB)  # compact column -> input channel (the two ranges)
    chunk = tl.cdiv(tl.cdiv(NPIX, SPLIT), BLOCK_PIX) * BLOCK_PIX
    start = split * chunk
    stop = tl.minimum(start + chunk, NPIX)
    if ACC_F64:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for p0 in range(start, stop, BLOCK_PIX):
        p = p0 + tl.arange(0, BLOCK_PIX)
        p_mask = p < stop
        wo = (p % WO).to(tl.int64)
        rest = p // WO
        ho = (rest % HO).to(tl.int64)
        b = (rest // HO).to(tl.int64)
        d = tl.load((dy + b * sdb + ho * sdh + wo * sdw)[:, None] + j[None, :] * sdc,
                    mask=p_mask[:, None] & j_mask[None, :], other=0.0)
        a = tl.load((x + b * sxb + (ho * STRIDE_H) * sxh + (wo * STRIDE_W) * sxw)[:, None] + channel[None, :] * sxc,
                    mask=p_mask[:, None] & c_mask[None, :], other=0.0)
        acc = _mma(tl.trans(d), a, acc, UPCAST, PRECISION)
    out = ws + (split * COUT + j)[:, None].to(tl.int64) * width + cc[None, :]
    tl.store(out, acc, mask=j_mask[:, None] & c_mask[None, :])


def _flags(dtype: torch.dtype, allow_tf32: bool) -> dict:
    precision = "tf32" if dtype == torch.float32 and allow_tf32 and not INTERPRET else "ieee"
    return {"ACC_F64": dtype == torch.float64, "UPCAST": INTERPRET and dtype == torch.bfloat16,
            "PRECISION": precision}


def hetconv_forward(x: Tensor, weight_kxk: Tensor, weight_1x1: Tensor | None, bias: Tensor | None,
                    stride: tuple[int, int], part: int, allow_tf32: bool) -> Tensor:
    """Launch the fused forward kernel (no argument checks: the caller has made them).

    Args:
        x (Tensor[B, M, H, W]): any strides; channels-last is the fast layout.
        weight_kxk (Tensor[N, M/P, kh, kw]): any strides.
        weight_1x1 (Tensor[N, M - M/P] or None): None when ``part == 1``.
        bias (Tensor[N] or None).
        stride (tuple[int, int]): of both parts.
        part (int): ``P``.
        allow_tf32 (bool): float32 ``tl.dot`` in TF32 rather than IEEE float32.

    Returns:
        Tensor[B, N, HO, WO]: channels-last, in ``x``'s dtype.
    """
    batch, cin, height, width = x.shape
    cout, mb, kh, kw = weight_kxk.shape
    ho, wo = (height - 1) // stride[0] + 1, (width - 1) // stride[1] + 1
    y = torch.empty((batch, cout, ho, wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    npix = batch * ho * wo
    if y.numel() == 0:
        return y
    nb = cout // part
    has_1x1 = weight_1x1 is not None and weight_1x1.numel() > 0
    w1 = weight_1x1 if has_1x1 else weight_kxk
    s1 = weight_1x1.stride() if has_1x1 else (0, 0)

    def grid(meta):
        return (triton.cdiv(npix, meta["BLOCK_PIX"]), part * triton.cdiv(nb, meta["BLOCK_N"]))

    with _on(x.device):
        _forward_kernel[grid](
            x, weight_kxk, w1, bias if bias is not None else weight_kxk, y,
            npix, height, width, ho, wo, cin, cout, mb, nb,
            x.stride(0), x.stride(2), x.stride(3), x.stride(1), *weight_kxk.stride(), *s1,
            y.stride(0), y.stride(2), y.stride(3), y.stride(1),
            KH=kh, KW=kw, STRIDE_H=stride[0], STRIDE_W=stride[1], HAS_1X1=has_1x1, HAS_BIAS=bias is not None,
            **_flags(x.dtype, allow_tf32),
        )
    return y


def _on(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current device), or nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _split(npix: int, tiles: int, device: torch.device) -> int:
    """Pixel chunks of the weight-gradient reduction: enough programs to fill the GPU."""
    if INTERPRET or device.type != "cuda":
        return 1
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(programs, max(tiles, 1)), triton.cdiv(npix, 256)))


def grad_weight_1x1(grad: Tensor, x: Tensor, stride: tuple[int, int], part: int, allow_tf32: bool) -> Tensor:
    """Compact 1 x 1 weight gradient, ``(N, M - M/P)``, in ``x``'s dtype.

    Args:
        grad (Tensor[B, N, HO, WO]): the output gradient, any strides.
        x (Tensor[B, M, H, W]): the layer input, any strides.
        stride (tuple[int, int]): the layer's stride (the 1 x 1 part samples ``x`` at it).
        part (int): ``P``.
        allow_tf32 (bool): as for :func:`hetconv_forward`.
    """
    batch, cout, ho, wo = grad.shape
    cin = x.shape[1]
    mb, nb = cin // part, cout // part
    width = cin - mb
    npix = batch * ho * wo
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if npix == 0 or width == 0:
        return torch.zeros((cout, width), dtype=x.dtype, device=x.device)
    split = _split(npix, part * triton.cdiv(nb, 64) * triton.cdiv(width, 64), x.device)
    ws = torch.empty((split, cout, width), dtype=acc_dtype, device=x.device)

    def grid(meta):
        return (part * triton.cdiv(nb, meta["BLOCK_N"]), triton.cdiv(width, meta["BLOCK_K"]), split)

    with _on(x.device):
        _wgrad_kernel[grid](
            grad, x, ws, npix, ho, wo, cin, cout, mb, nb, split,
            grad.stride(0), grad.stride(2), grad.stride(3), grad.stride(1),
            x.stride(0), x.stride(2), x.stride(3), x.stride(1),
            STRIDE_H=stride[0], STRIDE_W=stride[1], **_flags(x.dtype, allow_tf32),
        )
    return (ws[0] if split == 1 else ws.sum(0)).to(x.dtype)
