"""Reference implementations the benchmark compares against, written as their authors wrote them.

* :class:`PublishedHetConv` — the published "efficient" HetConv (Singh et al., CVPR 2019,
  https://arxiv.org/abs/1903.04120, and its public VGG-16 script): ``gwc(x) + pwc(x)`` with a
  grouped 3 x 3 convolution and a full 1 x 1 convolution, NCHW, a float mask kept beside the
  weights, and the mask applied to ``pwc.weight.grad`` by the training loop after ``backward()``
  (:func:`mask_gradients`). Nothing is masked in ``forward``.
* :class:`LoopHetConv` — the per-filter loop some implementations use: every filter is its own
  k x k convolution over its block plus its own 1 x 1 convolution over the other channels.

Both take their weights from a :class:`sparse_hetconv.MaskedHetConv2d`, so their outputs can be
checked against the library's before anything is timed.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from sparse_hetconv.masked import MaskedHetConv2d

__all__ = ["PublishedHetConv", "LoopHetConv", "mask_gradients", "published_from_masked"]


class PublishedHetConv(nn.Module):
    """``gwc(x) + pwc(x)``; the training loop masks ``pwc.weight.grad`` (the published form)."""

    def __init__(self, in_channels: int, out_channels: int, part: int, stride: int = 1) -> None:
        super().__init__()
        self.gwc = nn.Conv2d(in_channels, out_channels, 3, stride, 1, groups=part, bias=False)
        self.pwc = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
        n, m = out_channels // part, in_channels // part
        mask = torch.ones(out_channels, in_channels, 1, 1)
        for g in range(part):
            mask[g * n:(g + 1) * n, g * m:(g + 1) * m] = 0
        self.register_buffer("mask", mask)
        with torch.no_grad():
            self.pwc.weight.mul_(self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gwc(x) + self.pwc(x)


def mask_gradients(model: nn.Module) -> None:
    """What the published training loop does after ``loss.backward()``."""
    for module in model.modules():
        if isinstance(module, PublishedHetConv) and module.pwc.weight.grad is not None:
            module.pwc.weight.grad.mul_(module.mask)


def _published_layer(masked: MaskedHetConv2d) -> PublishedHetConv:
    layer = PublishedHetConv(masked.in_channels, masked.out_channels, masked.part, masked.stride[0])
    with torch.no_grad():
        layer.gwc.weight.copy_(masked.gwc.weight)
        layer.pwc.weight.copy_(masked.masked_1x1())
    return layer.to(masked.gwc.weight.dtype).train(masked.training)


def published_from_masked(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (NCHW) with every :class:`MaskedHetConv2d` as a :class:`PublishedHetConv`."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, MaskedHetConv2d):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _published_layer(module))
    if isinstance(model, MaskedHetConv2d):
        model = _published_layer(model)
    return model._apply(lambda t: t.contiguous())


class LoopHetConv(nn.Module):
    """One 3 x 3 and one 1 x 1 convolution per filter (the slow, literal implementation).

    The channel slices each group's filters read are cut once per group, not once per filter.
    """

    def __init__(self, masked: MaskedHetConv2d) -> None:
        super().__init__()
        self.part, self.m, self.n = masked.part, masked.pattern.block_in, masked.pattern.block_out
        self.kxk = nn.Parameter(masked.gwc.weight.detach().clone().contiguous())
        dense = masked.masked_1x1().detach().reshape(masked.out_channels, masked.in_channels)
        self.one = nn.Parameter(masked.pattern.gather_1x1(dense).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for g in range(self.part):
            block = x[:, g * self.m:(g + 1) * self.m]
            others = torch.cat([x[:, :g * self.m], x[:, (g + 1) * self.m:]], dim=1)
            for j in range(g * self.n, (g + 1) * self.n):
                y = F.conv2d(block, self.kxk[j:j + 1], padding=1)
                outs.append(y + F.conv2d(others, self.one[j].view(1, -1, 1, 1)))
        return torch.cat(outs, dim=1)
