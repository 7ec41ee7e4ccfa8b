"""Memory format of a model's parameters: channels-last end to end is this library's default.

oneDNN (the CPU convolution library under PyTorch) runs the grouped and 1 x 1 convolutions of
HetConv layers markedly faster in channels-last than in NCHW (docs/performance.md has the
measurements), and a convolution with a channels-last weight returns a channels-last output, so
converting the parameters once makes every activation channels-last too (the input may stay NCHW).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MEMORY_FORMATS", "apply_memory_format", "check_memory_format"]

MEMORY_FORMATS = (torch.channels_last, torch.contiguous_format, None)


def check_memory_format(memory_format: object) -> None:
    """Require ``torch.channels_last``, ``torch.contiguous_format`` or None."""
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format ({memory_format!r}) must be torch.channels_last, "
                         "torch.contiguous_format or None (leave parameters as they are)")


def apply_memory_format(module: nn.Module, memory_format) -> nn.Module:
    """Lay out every 4-D (5-D) floating-point parameter and buffer of ``module`` in place.

    ``torch.channels_last`` turns 4-D tensors channels-last and 5-D ones ``channels_last_3d``;
    ``torch.contiguous_format`` makes them NC(D)HW; None changes nothing. Returns ``module``.
    """
    check_memory_format(memory_format)
    if memory_format is None:
        return module

    def convert(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point() or t.dim() not in (4, 5):
            return t
        if memory_format is torch.contiguous_format:
            return t.contiguous()
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)

    return module._apply(convert)
