"""What the masked and the sparse HetConv layers share: geometry, checks and ``extra_repr``."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._checks import check_bool, check_device, check_dtype, check_input, check_tuple
from .pattern import HetConvPattern

_DIMS_NAME = {2: "2d", 3: "3d"}


class _HetConvBase(nn.Module):
    """Geometry of a HetConv layer; subclasses set ``_dims`` and own the parameters."""

    _dims: int = 2

    def _init_geometry(self, in_channels, out_channels, part, kernel_size, stride) -> None:
        self.pattern = HetConvPattern(in_channels, out_channels, part, kernel_size, self._dims)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.part = part
        self.kernel_size = self.pattern.kernel_size
        self.stride = check_tuple("stride", stride, self._dims)
        self.padding = self.pattern.padding

    @staticmethod
    def _check_factory(bias: object, device: object, dtype: object) -> None:
        """``bias`` a bool, ``device`` and ``dtype`` what ``nn.Conv2d`` takes; before any tensor is made."""
        check_bool("bias", bias)
        check_device(device)
        check_dtype(dtype)

    def _init_bound(self) -> float:
        """``nn.ConvNd``'s default bound ``1 / sqrt(fan_in)`` over the filter's real fan-in."""
        fan_in = self.pattern.kernel_numel * self.pattern.block_in + self.pattern.num_1x1
        return 1.0 / math.sqrt(fan_in)

    def _check_input(self, input: torch.Tensor) -> None:
        check_input(input, self.in_channels, self._dims, type(self).__name__)

    def _geometry_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, part={self.part}"
        if self.kernel_size != (3,) * self._dims:
            text += f", kernel_size={_compact(self.kernel_size)}"
        if self.stride != (1,) * self._dims:
            text += f", stride={_compact(self.stride)}"
        return text


def _compact(values: tuple[int, ...]):
    return values[0] if len(set(values)) == 1 else values
