"""Shared test helpers: the definition oracle, devices and dtypes, small builders.

The oracle computes HetConv straight from its definition (docs/design.md §2): one tiny
convolution per (filter, channel) pair. It shares no code with the library: it decides which
channel carries a k x k and which a 1 x 1 kernel by itself, and reads the compact 1 x 1 values
row by row in increasing channel order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The stock-kernel backends and "auto": what the suite sweeps on every device. The triton backend
# runs on the CPU only under Triton's (slow) interpreter; tests/backends/test_triton.py covers it
# there, and CUDA runs add it (CUDA_BACKENDS).
BACKENDS = ["dense", "grouped", "blocked", "torch_sparse", "auto"]
CUDA_BACKENDS = BACKENDS + ["triton"]
CONV = {2: F.conv2d, 3: F.conv3d}


def kxk_channels(j: int, in_channels: int, out_channels: int, part: int) -> list[int]:
    """Channels on which filter ``j`` has k x k kernels: the block of its group."""
    m, n = in_channels // part, out_channels // part
    g = j // n
    return list(range(g * m, (g + 1) * m))


def one_by_one_channels(j: int, in_channels: int, out_channels: int, part: int) -> list[int]:
    """Channels on which filter ``j`` has 1 x 1 kernels, in increasing order."""
    inside = set(kxk_channels(j, in_channels, out_channels, part))
    return [c for c in range(in_channels) if c not in inside]


def oracle(x, weight_kxk, weight_1x1, bias, stride, part, padding=None, dilation=1):
    """HetConv by definition: ``y[b, j] = sum_c kernel(j, c) * x[b, c]`` (float64 recommended).

    A 1 x 1 kernel reads the input where the k x k kernels' centre tap does: offset
    ``dilation * (k // 2) - padding`` from the top-left corner, at the stride.

    Args:
        x: (B, M, *S); weight_kxk: (N, M/P, *k); weight_1x1: (N, M - M/P) or None; bias: (N,) or None.
        padding: default ``dilation * (k // 2)``; dilation: of the k x k kernels.
    """
    dims = weight_kxk.dim() - 2
    conv = CONV[dims]
    in_channels, out_channels = x.shape[1], weight_kxk.shape[0]
    kernel = weight_kxk.shape[2:]
    stride = (stride,) * dims if isinstance(stride, int) else tuple(stride)
    dilation = (dilation,) * dims if isinstance(dilation, int) else tuple(dilation)
    if padding is None:
        padding = tuple(d * (k // 2) for d, k in zip(dilation, kernel))
    padding = (padding,) * dims if isinstance(padding, int) else tuple(padding)
    size = conv(x[:, :1], weight_kxk[:1, :1], None, stride, padding, dilation).shape[2:]
    at = (slice(None), slice(None)) + tuple(slice(d * (k // 2) - p, None) for d, k, p in zip(dilation, kernel, padding))
    crop = (slice(None), slice(None)) + tuple(slice(0, n) for n in size)
    columns = []
    for j in range(out_channels):
        # Filter j's kernel on channel c is weight_kxk[j, t] for the t-th channel of its block and
        # weight_1x1[j, t] for the t-th of the others: each channel's products summed by one
        # convolution per kind of kernel (the sum over channels is the definition's sum).
        inside = kxk_channels(j, in_channels, out_channels, part)
        y = conv(x[:, inside], weight_kxk[j][None], None, stride, padding, dilation)
        outside = one_by_one_channels(j, in_channels, out_channels, part)
        if outside:
            ones = weight_1x1[j].reshape((1, len(outside)) + (1,) * dims)
            y = y + conv(x[at][:, outside], ones, None, stride)[crop]
        if bias is not None:
            y = y + bias[j]
        columns.append(y)
    return torch.cat(columns, dim=1)


def oracle_of(layer, x):
    """The oracle applied to a SparseHetConv layer's parameters."""
    return oracle(x, layer.weight_kxk, layer.weight_1x1, layer.bias, layer.stride, layer.part)


def masked_reference_weights(masked):
    """(weight_kxk, compact 1x1 values, bias) of a MaskedHetConv, read by definition."""
    n_out, n_in, part = masked.out_channels, masked.in_channels, masked.part
    dense = masked.pwc.weight.reshape(n_out, n_in)
    values = torch.stack([dense[j, one_by_one_channels(j, n_in, n_out, part)] for j in range(n_out)]) \
        if part > 1 else None
    return masked.gwc.weight, values, masked.gwc.bias


def assert_close(actual, expected, what: str, rtol=1e-7, atol=1e-9):
    """``torch.testing.assert_close`` with a message that says what was compared."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def assert_agrees(actual, expected, what: str, tol: float = 1e-9, scale=None):
    """``actual`` against the oracle's ``expected``, non-finite values included (docs/design.md §9).

    NaN, ``+inf`` and ``-inf`` must sit exactly where ``expected`` has them; finite values must be
    within ``tol * scale``, ``scale`` being the magnitude of the terms each value sums (a tensor of
    ``expected``'s shape: the oracle of the absolute values), or by default ``expected``'s largest
    finite magnitude.
    """
    assert actual is not None, f"{what}: no tensor (no gradient reached it)"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    actual, expected = actual.detach().double(), expected.detach().double()
    for name, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        got, wanted = test(actual), test(expected)
        assert torch.equal(got, wanted), (f"{what}: {name} at {int(got.sum())} positions, the oracle at "
                                          f"{int(wanted.sum())} ({int((got != wanted).sum())} differ)")
    finite = torch.isfinite(expected)
    if not finite.any():
        return
    if scale is None:
        bound = tol * float(expected[finite].abs().max().clamp(min=1e-3))
    else:
        bound = tol * (scale.detach().double()[finite] + 1e-3)
    error = (actual[finite] - expected[finite]).abs()
    worst = int(torch.argmax(error - bound))
    assert bool((error <= bound).all()), (
        f"{what}: {int((error > bound).sum())} of {error.numel()} finite values off by more than {tol:g} of "
        f"their scale; worst {float(actual[finite][worst]):.6g} vs the oracle's {float(expected[finite][worst]):.6g}")
