"""What the masked and the sparse HetConv layers share: geometry, checks and ``extra_repr``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (centre_padding, check_bool, check_device, check_dtype, check_input, check_padding,
                      check_padding_mode, check_tuple)
from .pattern import HetConvPattern

_DIMS_NAME = {2: "2d", 3: "3d"}


class _HetConvBase(nn.Module):
    """Geometry of a HetConv layer; subclasses set ``_dims`` and own the parameters."""

    _dims: int = 2

    def _init_geometry(self, in_channels, out_channels, part, kernel_size, stride, padding=None, dilation=1,
                       padding_mode="zeros") -> None:
        """Check and store the geometry, ``nn.Conv2d``'s way, before any tensor is made.

        ``padding``: ``None`` or ``"same"`` (``dilation * (k // 2)``: the centre taps on the input's
        pixels, HetConv's own geometry), ``"valid"`` or ints in ``[0, dilation * (k // 2)]``
        (:func:`~sparse_hetconv._checks.check_padding`); ``padding_mode`` any of ``nn.Conv2d``'s,
        computed by padding the input (``F.pad``) and running the layer with padding 0.
        """
        self.pattern = HetConvPattern(in_channels, out_channels, part, kernel_size, self._dims)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.part = part
        self.kernel_size = self.pattern.kernel_size
        self.stride = check_tuple("stride", stride, self._dims)
        self.dilation = check_tuple("dilation", dilation, self._dims)
        self.padding = check_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.padding_mode = check_padding_mode(padding_mode)

    @property
    def default_geometry(self) -> bool:
        """Whether the layer has HetConv's own geometry: padding ``k // 2``, dilation 1, zero padding."""
        return (self.dilation == (1,) * self._dims and self.padding == self.pattern.padding
                and self.padding_mode == "zeros")

    def _padded(self, input: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``(input, padding)`` for a call with zero padding: with another ``padding_mode`` the input
        padded by ``F.pad`` in that mode, and padding 0. The 1 x 1 part stays exact: the centre tap
        of output pixel ``i`` reads the padded input at ``i * stride + dilation * (k // 2)``, which is
        the original pixel ``i * stride + dilation * (k // 2) - padding`` it reads with zero padding."""
        if self.padding_mode == "zeros" or not any(self.padding):
            return input, self.padding
        pad = tuple(p for size in reversed(self.padding) for p in (size, size))
        return F.pad(input, pad, mode=self.padding_mode), (0,) * self._dims

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
        if self.padding != centre_padding(self.kernel_size, self.dilation):
            text += f", padding={_compact(self.padding)}"
        if self.dilation != (1,) * self._dims:
            text += f", dilation={_compact(self.dilation)}"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        return text


def _compact(values: tuple[int, ...]):
    return values[0] if len(set(values)) == 1 else values
