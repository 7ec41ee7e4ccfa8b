"""HetConv as people write it outside the published layouts, each written from its description only.

The conformance set of conversion by probing (issue 23): nothing here imports the library, so the
converter cannot recognise these modules by their code, only by what they compute. Each class has
``dense()``, the ``(weight, bias)`` of the one convolution it computes (padding ``k // 2``), worked
out by hand from the description, for the tests to compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BranchHetConv(nn.Module):
    """The per-branch form of object-detection code: ``p`` branches; branch ``i`` holds ``N/p``
    filters, a k x k convolution over the input channels ``i, i+p, ...`` and a 1 x 1 convolution
    over a Python list of the remaining channel indices; the branch outputs are interleaved, so
    output channel ``c`` comes from branch ``c % p``. (No ``in_channels`` attribute.)"""

    def __init__(self, in_ch, out_ch, p, kernel_size=3, stride=1, bias=False):
        super().__init__()
        self.p = p
        self.kxk = nn.ModuleList(nn.Conv2d(in_ch // p, out_ch // p, kernel_size, stride, kernel_size // 2, bias=bias)
                                 for _ in range(p))
        self.pw = nn.ModuleList(nn.Conv2d(in_ch - in_ch // p, out_ch // p, 1, stride, bias=False) for _ in range(p))
        self.rest = [[c for c in range(in_ch) if c % p != i] for i in range(p)]

    def forward(self, x):
        outs = [self.kxk[i](x[:, i::self.p]) + self.pw[i](x[:, self.rest[i]]) for i in range(self.p)]
        return torch.stack(outs, 2).flatten(1, 2)  # (batch, N/p, p, ...): channel t * p + i from branch i

    def dense(self):
        p, k = self.p, self.kxk[0].kernel_size[0]
        out_ch, in_ch = p * self.kxk[0].out_channels, len(self.rest[0]) + self.kxk[0].in_channels
        weight, bias = torch.zeros(out_ch, in_ch, k, k, dtype=torch.float64), torch.zeros(out_ch, dtype=torch.float64)
        for i in range(p):
            for t in range(out_ch // p):
                weight[t * p + i, i::p] = self.kxk[i].weight[t].double()
                weight[t * p + i, self.rest[i], k // 2, k // 2] = self.pw[i].weight[t, :, 0, 0].double()
                if self.kxk[i].bias is not None:
                    bias[t * p + i] = self.kxk[i].bias[t].double()
        return weight, (bias if self.kxk[0].bias is not None else None)


class SubtractDiagonal(nn.Module):
    """Grouped k x k plus a full 1 x 1 minus a grouped 1 x 1 (its own weights, on the block diagonal),
    each with a bias, written with raw parameters and ``F.conv2d``."""

    def __init__(self, in_ch, out_ch, p, kernel_size=5, stride=1):
        super().__init__()
        self.p, self.stride = p, stride
        self.w_kxk = nn.Parameter(torch.randn(out_ch, in_ch // p, kernel_size, kernel_size) / kernel_size)
        self.w_full = nn.Parameter(torch.randn(out_ch, in_ch, 1, 1) / in_ch ** 0.5)
        self.w_diag = nn.Parameter(torch.randn(out_ch, in_ch // p, 1, 1) / in_ch ** 0.5)
        self.b_kxk, self.b_full, self.b_diag = (nn.Parameter(torch.randn(out_ch)) for _ in range(3))

    def forward(self, x):
        k = self.w_kxk.shape[-1]
        return (F.conv2d(x, self.w_kxk, self.b_kxk, self.stride, k // 2, groups=self.p)
                + F.conv2d(x, self.w_full, self.b_full, self.stride)
                - F.conv2d(x, self.w_diag, self.b_diag, self.stride, groups=self.p))

    def dense(self):
        out_ch, in_ch, k, p = self.w_full.shape[0], self.w_full.shape[1], self.w_kxk.shape[-1], self.p
        n, m = out_ch // p, in_ch // p
        weight = torch.zeros(out_ch, in_ch, k, k, dtype=torch.float64)
        weight[:, :, k // 2, k // 2] = self.w_full[:, :, 0, 0].double()
        for j in range(out_ch):
            g = j // n
            weight[j, g * m:(g + 1) * m] += self.w_kxk[j].double()
            weight[j, g * m:(g + 1) * m, k // 2, k // 2] -= self.w_diag[j, :, 0, 0].double()
        return weight, (self.b_kxk + self.b_full - self.b_diag).double()


class MaskedDense(nn.Module):
    """A dense convolution multiplied by the paper's shifted mask in ``forward`` (the naive
    implementation): filter ``j`` keeps full k x k kernels on channels ``c`` with ``(c - j) % p == 0``
    and only the centre tap elsewhere."""

    def __init__(self, in_ch, out_ch, p, kernel_size=3, stride=1, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, bias=bias)
        mask = torch.zeros(out_ch, in_ch, kernel_size, kernel_size)
        mask[:, :, kernel_size // 2, kernel_size // 2] = 1
        for j in range(out_ch):
            mask[j, (torch.arange(in_ch) - j) % p == 0] = 1
        self.register_buffer("mask", mask)

    def forward(self, x):
        c = self.conv
        return F.conv2d(x, c.weight * self.mask, c.bias, c.stride, c.padding)

    def dense(self):
        bias = None if self.conv.bias is None else self.conv.bias.double()
        return (self.conv.weight * self.mask).double(), bias


class ShuffledPair(nn.Module):
    """A grouped k x k and a pointwise 1 x 1 convolution over the same input, with ShuffleNet's channel
    shuffle between the grouped convolution and the sum: ``pw(x) + shuffle(gconv(x))``."""

    def __init__(self, in_ch, out_ch, p, kernel_size=3, stride=1):
        super().__init__()
        self.p = p
        self.gconv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=p, bias=False)
        self.pw = nn.Conv2d(in_ch, out_ch, 1, stride, bias=True)

    def forward(self, x):
        y = self.gconv(x)
        b, c = y.shape[:2]
        shuffled = y.view(b, self.p, c // self.p, *y.shape[2:]).transpose(1, 2).reshape(y.shape)
        return self.pw(x) + shuffled

    def dense(self):
        out_ch, in_ch, k = self.pw.out_channels, self.pw.in_channels, self.gconv.kernel_size[0]
        n, m = out_ch // self.p, in_ch // self.p
        weight = torch.zeros(out_ch, in_ch, k, k, dtype=torch.float64)
        weight[:, :, k // 2, k // 2] = self.pw.weight[:, :, 0, 0].double()
        for i in range(out_ch):  # shuffled channel t * p + g is grouped output g * n + t
            t, g = divmod(i, self.p)
            weight[i, g * m:(g + 1) * m] += self.gconv.weight[g * n + t].double()
        return weight, self.pw.bias.double()


def net(form="BranchHetConv", width=16, p=4, stride=1, **kwargs):
    """A factory for the command line: stem conv + BatchNorm + ReLU, the HetConv ``form``, BatchNorm,
    ReLU, a 1 x 1 head, global average pooling."""
    layer = globals()[form](width, width, p, stride=stride, **kwargs)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), layer,
                         nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, 10, 1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())
