"""The one place models choose their convolution: a HetConv of a form, or a standard one."""

from __future__ import annotations

from torch import nn

from .._checks import check_int
from ..masked import MaskedHetConv2d
from ..sparse import SparseHetConv2d

__all__ = ["FORMS", "check_form", "make_conv"]

FORMS = ("sparse", "masked")


def check_form(form: object) -> str:
    if form not in FORMS:
        raise ValueError(f"form ({form!r}) must be one of {FORMS}")
    return form


def make_conv(in_channels: int, out_channels: int, part: int, form: str, stride: int = 1,
              kernel_size: int = 3, bias: bool = False, backend: str = "auto") -> nn.Module:
    """A k x k convolution with 'same' padding: HetConv for ``part > 1``, ``nn.Conv2d`` for 1."""
    check_int("part", part)
    if part == 1:
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=bias)
    if form == "sparse":
        return SparseHetConv2d(in_channels, out_channels, part, kernel_size, stride, bias, backend=backend)
    return MaskedHetConv2d(in_channels, out_channels, part, kernel_size, stride, bias)
