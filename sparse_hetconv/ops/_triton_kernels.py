"""The Triton kernel of the ``het_conv2d`` operator and its launcher (imported on first use).

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120.

* :func:`hetconv_forward` — the whole layer as one channels-last implicit GEMM. A program owns a
  tile of output pixels x filters of one group ``g``; its reduction runs over the ``k*k*m`` taps
  of block ``g`` and then over the ``M - m`` existing 1 x 1 kernels, read straight from the
  compact ``weight_1x1`` in two contiguous ranges: channels ``[0, g*m)`` are compact columns
  ``[0, g*m)``, channels ``[(g+1)*m, M)`` are compact columns ``[g*m, M - m)``. No index tensor,
  no scatter, no multiplication by zeros. Bias in the epilogue; the output is written once.

It accumulates in float32 (float64 for float64 tensors, which only the interpreter runs). Under
``TRITON_INTERPRET=1`` the kernel has ONE small tile config (autotuning would run every config in
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

__all__ = ["INTERPRET", "hetconv_forward"]

# Triton itself decides at decoration time whether ``@triton.jit`` builds interpreted kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


def _config(pix: int, n: int, k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_PIX": pix, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)


if INTERPRET:
    _FORWARD_CONFIGS = [_config(64, 16, 16, 1, 1)]
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


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(max(int(x), 1)))


def _prune_forward(configs, named_args, **kwargs):
    """Drop tiles wider than the group's filters or the block's channels (pure waste)."""
    n, m = _pow2(named_args["NB"]), _pow2(named_args["MB"])
    pixels = _pow2(named_args["NPIX"])
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= n and c.kwargs["BLOCK_K"] <= max(m, 32)
            and c.kwargs["BLOCK_PIX"] <= pixels]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_PIX"] * c.kwargs["BLOCK_N"])]


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
