"""The one place models choose their convolution: a HetConv of a form, or a standard one."""

from __future__ import annotations

from torch import nn

from .._checks import check_bool, check_int, check_odd, check_tuple
from ..backends import check_backend
from ..masked import MaskedHetConv2d
from ..sparse import SparseHetConv2d

__all__ = ["FORMS", "check_form", "make_conv"]

FORMS = ("sparse", "masked")


def check_form(form: object) -> str:
    """Return ``form`` if it is one of :data:`FORMS` (``"sparse"``, ``"masked"``)."""
    if not isinstance(form, str) or form not in FORMS:
        raise ValueError(f"form ({form!r}) must be one of {FORMS}")
    return form


def make_conv(in_channels: int, out_channels: int, part: int, form: str, stride: int = 1,
              kernel_size: int = 3, bias: bool = False, backend: str = "auto") -> nn.Module:
    """A k x k convolution with 'same' padding: HetConv for ``part > 1``, ``nn.Conv2d`` for 1.

    Every argument is checked whatever ``part`` is (a ``backend`` is checked for the masked form
    and at ``part=1`` too, where no layer uses it), so a model's arguments are checked once for
    all its layers.

    Raises:
        TypeError / ValueError: an argument of the wrong type or value (the message names it).
    """
    check_int("in_channels", in_channels)
    check_int("out_channels", out_channels)
    check_int("part", part)
    check_form(form)
    check_tuple("stride", stride, 2)
    sizes = check_odd("kernel_size", check_tuple("kernel_size", kernel_size, 2))
    check_bool("bias", bias)
    check_backend(backend)
    if part == 1:
        return nn.Conv2d(in_channels, out_channels, sizes, stride, tuple(k // 2 for k in sizes), bias=bias)
    if form == "sparse":
        return SparseHetConv2d(in_channels, out_channels, part, kernel_size, stride, bias, backend=backend)
    return MaskedHetConv2d(in_channels, out_channels, part, kernel_size, stride, bias)
