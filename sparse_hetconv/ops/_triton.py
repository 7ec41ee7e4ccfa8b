"""The Triton kernels of the ``het_conv2d`` operator (:mod:`sparse_hetconv.ops`, ``impl="triton"``;
what ``impl="auto"`` runs on CUDA).

:func:`forward` computes ``grouped k x k conv + compact 1 x 1 part + bias`` in one channels-last
implicit GEMM (:mod:`._triton_kernels`, docs/design.md §10): no zero is multiplied. A non-channels-last
input is copied to channels-last once; float16 and bfloat16 accumulate in float32; float32 uses TF32
exactly when ``torch.backends.cudnn.allow_tf32`` is True; float64 runs under Triton's interpreter
only. :func:`grad_input` at stride 1 reuses the forward kernel (the transposed layer is a HetConv
again); other gradients use :mod:`sparse_hetconv.ops.stock`.

Triton is imported on first use: importing this module needs only torch. To run the kernel on the
CPU with Triton's (slow) interpreter, set ``TRITON_INTERPRET=1`` before triton is first imported.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .stock import transposed_values

__all__ = ["available", "forward", "grad_input"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Triton decides at decoration time whether ``@triton.jit`` builds interpreted kernels; the kernels
# module is imported after this one, so both read the same setting.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    from . import _triton_kernels

    return _triton_kernels


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available(device: torch.device | None = None) -> bool:
    """Whether the kernels run on ``device`` (default: anywhere) here: triton imports, and the device
    is CUDA, or the CPU under the interpreter."""
    if not _triton_importable():
        return False
    if device is None:
        return torch.cuda.is_available() or _INTERPRET
    return device.type == "cuda" or (device.type == "cpu" and _INTERPRET)


def _allow_tf32() -> bool:
    """Whether float32 convolutions may use TF32: ``torch.backends.cudnn.allow_tf32``, or, where
    the newer ``fp32_precision`` settings are in use (reading the legacy flag then raises), the
    first of ``cudnn.conv``, ``cudnn`` and ``torch.backends`` that is set."""
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        cudnn = torch.backends.cudnn
        for precision in (cudnn.conv.fp32_precision, cudnn.fp32_precision, torch.backends.fp32_precision):
            if precision != "none":
                return precision == "tf32"
        return False


def _check_dtype(t: Tensor) -> None:
    allowed = _DTYPES + ((torch.float64,) if _INTERPRET else ())
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"kernel 'triton' computes {names}, got {t.dtype}")


def forward(input: Tensor, weight_kxk: Tensor, weight_1x1: Tensor, bias: Tensor | None, stride: tuple[int, int],
            part: int) -> Tensor:
    """The layer (checked by the operator: padding ``k // 2``, dilation 1, ``part >= 2``).

    Returns:
        Tensor[batch, out_channels, floor((H-1)/s)+1, floor((W-1)/s)+1], channels-last, in the
        input's dtype. An empty batch returns an empty tensor without launching a kernel.
    """
    _check_dtype(input)
    # NHWC activations; k x k weights with contiguous input channels (no copy for channels-last
    # parameters, one small copy of the weights otherwise) so that the kernel's loads coalesce.
    x = input.contiguous(memory_format=torch.channels_last)
    weight = weight_kxk.contiguous(memory_format=torch.channels_last)
    bias = None if bias is None else bias.contiguous()  # the kernel reads bias[j] at unit stride
    return _kernels().hetconv_forward(x, weight, weight_1x1, bias, tuple(stride), part, _allow_tf32())


def grad_input(grad: Tensor, weight_kxk: Tensor, weight_1x1: Tensor, part: int) -> Tensor:
    """The input gradient at stride 1: the forward kernel on the transposed layer."""
    _check_dtype(grad)
    cin, cout = weight_kxk.shape[1] * part, weight_kxk.shape[0]
    kh, kw = weight_kxk.shape[2:]
    nb, mb = cout // part, cin // part
    kxk_t = weight_kxk.reshape(part, nb, mb, kh, kw).transpose(1, 2).flip(-2, -1).reshape(cin, nb, kh, kw)
    values = transposed_values(weight_1x1, part) if part > 1 else weight_1x1.new_zeros((cin, 0))
    return forward(grad, kxk_t, values, None, (1, 1), part)
