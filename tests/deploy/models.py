"""Small HetConv models for the deployment tests (a factory the command line can name:
``--model models:small_net``, since tests/deploy is on the import path of these tests)."""

from __future__ import annotations

import torch
from torch import nn

from sparse_hetconv import MaskedHetConv2d, SparseHetConv2d


def small_net(part: int = 4, form: str = "sparse", num_classes: int = 10) -> nn.Module:
    """Stem, two HetConv layers (one strided, one with a bias) with BatchNorm, pooling, classifier."""
    conv = (lambda *a, **k: SparseHetConv2d(*a, **k)) if form == "sparse" else MaskedHetConv2d
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        conv(32, 64, part, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        conv(64, 64, part, bias=True), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


def with_statistics(model: nn.Module, size=(3, 16, 16), seed: int = 0) -> nn.Module:
    """BatchNorm statistics of a few random batches (folding the defaults would prove little)."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn((8,) + tuple(size)))
    return model.eval()
