"""How ``backend="auto"`` picks the backend that computes a layer's 1 x 1 part."""

from __future__ import annotations

import torch

from .pattern import HetConvPattern

__all__ = ["choose"]


def choose(pattern: HetConvPattern, input: torch.Tensor | None = None, training: bool | None = None) -> str:
    """The backend for this pattern and input: ``"dense"``, the stock 1 x 1 convolution."""
    return "dense"
