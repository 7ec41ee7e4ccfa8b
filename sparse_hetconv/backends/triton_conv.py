"""The ``triton`` backend: the whole 2-D HetConv layer as one fused Triton kernel.

HetConv: Singh et al., "HetConv: Heterogeneous Kernel-Based Convolutions for Deep CNNs", CVPR 2019,
https://arxiv.org/abs/1903.04120. :func:`het_conv2d_triton` computes ``grouped k x k conv + compact
1 x 1 part + bias`` in one channels-last implicit GEMM (:mod:`._triton_kernels`): each program
reduces over the ``k*k*m`` taps of its group's block and then over the ``M - m`` existing 1 x 1
kernels, read straight from ``weight_1x1`` in two contiguous channel ranges; nothing is scattered
and no zero is multiplied.

Conventions:

* **Layout.** The kernel reads NHWC: an input that is not channels-last is first copied to
  channels-last (``input.contiguous(memory_format=torch.channels_last)``, one copy per call, and
  once more in the backward). The output is NHWC memory, returned as an NCHW-shaped tensor with
  channels-last strides.
* **Precision.** float16 and bfloat16 accumulate in float32 and return the input dtype. float32
  runs ``tl.dot`` in TF32 exactly when ``torch.backends.cudnn.allow_tf32`` is True (PyTorch's
  convolution convention, read at call time), else in IEEE float32. float64 runs under Triton's
  interpreter only. Under ``torch.autocast`` ("cuda" and "cpu") the floating inputs are cast to
  the autocast dtype first, as for ``F.conv2d``.
* **Backward** (``torch.autograd``; every gradient of the existing kernels only):

  - ``grad_input``: ``"triton"`` (default) reuses the forward kernel at stride 1, since the
    transposed layer is a HetConv again (``N`` inputs, ``M`` filters, the same ``P``; k x k weights
    flipped and transposed per group, its compact 1 x 1 values a block permutation of the
    layer's): one fused pass, no zero kernels, no dense ``N x M`` matrix. At stride > 1, and with ``"stock"``, it uses
    ``torch.nn.grad.conv2d_input`` (grouped) plus the transposed 1 x 1 product as ``2P`` matrix
    products over contiguous channel slices, added at the strided positions.
  - ``grad_weight_1x1``: ``"stock"`` (default) is ``2P`` cuBLAS products
    ``dY_g^T X[:, two ranges]`` over the output pixels; ``"triton"`` is one kernel that reduces
    over pixel chunks into a float32 workspace. The default is stock because this reduction runs
    over ``B*H*W`` pixels into a small output, where cuBLAS's split-K heuristics are well tuned,
    while the Triton kernel pays a workspace and a second reduction; both are kept so that an
    autotuner can measure them on a GPU (no GPU was available when this was written).
  - ``grad_weight_kxk``: always ``torch.nn.grad.conv2d_weight`` (grouped, cuDNN on a GPU; in
    float32 where oneDNN's bfloat16 weight gradient is wrong on the CPU, see
    ``_common.bf16_conv_is_wrong``); ``grad_bias``: a sum over pixels.

  The backward computes in the saved tensors' dtype even when it runs inside an autocast region.

  The stock kernels follow their own TF32 switches (``cudnn.allow_tf32`` for the convolutions,
  ``torch.backends.cuda.matmul.allow_tf32`` for the products).
* **Graph capture.** The layer is the custom op ``torch.ops.sparse_hetconv.het_conv2d_triton``
  (``torch.library.custom_op`` with a fake implementation and an autograd formula), so
  ``torch.compile(fullgraph=True)`` and ``torch.export`` trace it as one node.

Triton is imported on first use: importing this module needs only torch, and :func:`available`
says whether the backend can run here. To run the kernels on the CPU with Triton's (slow)
interpreter, set ``TRITON_INTERPRET=1`` before this module (and triton) is first imported.
"""

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from ._common import bf16_conv_is_wrong

__all__ = ["GRAD_IMPLS", "available", "check_supported", "het_conv2d_triton"]

GRAD_IMPLS = ("triton", "stock")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Triton decides at decoration time whether ``@triton.jit`` builds interpreted kernels; the
# kernels module is imported after this one, so both read the same setting.
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


def available() -> bool:
    """Whether the backend can run here: triton imports, and CUDA or the interpreter is there."""
    return _triton_importable() and (torch.cuda.is_available() or _INTERPRET)


def check_supported(input: Tensor, weight_kxk: Tensor, stride) -> None:
    """Raise if the ``triton`` backend cannot compute this call.

    Args:
        input (Tensor[batch, in_channels, height, width]): the layer input.
        weight_kxk (Tensor[out_channels, in_channels / part, kh, kw]): the grouped k x k weights.
        stride (tuple[int, int]): the layer's stride.

    Raises:
        TypeError: ``input`` or ``weight_kxk`` is not a tensor.
        ValueError: triton is missing, or a rank, kernel size, stride, dtype or device the
            backend does not support (the message names the argument and what was expected).
    """
    for name, tensor in (("input", input), ("weight_kxk", weight_kxk)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected a 4-D tensor: backend 'triton' "
                             "computes 2-D HetConv only (use 'dense', 'grouped' or 'blocked' in 3-D)")
    kernel = tuple(weight_kxk.shape[2:])
    if any(k % 2 == 0 for k in kernel):
        raise ValueError(f"weight_kxk has kernel size {kernel}, expected odd sizes (a centre tap for the 1x1 part)")
    if (not isinstance(stride, (tuple, list)) or len(stride) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in stride)):
        raise ValueError(f"stride ({stride!r}) must be a tuple of two ints >= 1")
    if not _triton_importable():
        raise ValueError("backend 'triton' needs the triton package, which is not importable here "
                         "(pip install 'triton>=3.2')")
    allowed = _DTYPES + ((torch.float64,) if _INTERPRET else ())
    autocast = torch.is_autocast_enabled(input.device.type)
    for name, tensor in (("input", input), ("weight_kxk", weight_kxk)):
        if tensor.dtype not in allowed and not (autocast and tensor.dtype == torch.float32):
            names = ", ".join(str(d).replace("torch.", "") for d in allowed)
            raise ValueError(f"{name} has dtype {tensor.dtype}, expected one of {names} for backend 'triton'")
    if weight_kxk.dtype != input.dtype and not autocast:
        raise ValueError(f"weight_kxk has dtype {weight_kxk.dtype}, expected the input's dtype ({input.dtype})")
    if input.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"input is on {input.device}, expected a CUDA tensor for backend 'triton' (on the CPU "
                         "only Triton's interpreter runs it: set TRITON_INTERPRET=1 before importing triton)")
    if weight_kxk.device != input.device:
        raise ValueError(f"weight_kxk is on {weight_kxk.device}, expected the input's device ({input.device})")


def _check_call(input, weight_kxk, weight_1x1, bias, part, grad_input, grad_weight_1x1) -> None:
    """The checks :func:`check_supported` does not make: shapes against ``part``, switches."""
    if isinstance(part, bool) or not isinstance(part, int) or part < 1:
        raise ValueError(f"part ({part!r}) must be an int >= 1")
    cin, cout = input.shape[1], weight_kxk.shape[0]
    for name, channels in (("in_channels", cin), ("out_channels", cout)):
        if channels % part:
            raise ValueError(f"{name} ({channels}) must be divisible by part ({part})")
    if weight_kxk.shape[1] != cin // part:
        raise ValueError(f"weight_kxk has shape {tuple(weight_kxk.shape)}, expected ({cout}, {cin // part}, "
                         f"{weight_kxk.shape[2]}, {weight_kxk.shape[3]}) for {cin} input channels and part {part}")
    width = cin - cin // part
    if width == 0:
        if weight_1x1 is not None and weight_1x1.numel():
            raise ValueError("weight_1x1 must be None (or empty) when part is 1: there is no 1x1 part")
    elif weight_1x1 is None or tuple(weight_1x1.shape) != (cout, width):
        shape = None if weight_1x1 is None else tuple(weight_1x1.shape)
        raise ValueError(f"weight_1x1 has shape {shape}, expected ({cout}, {width}) for {cin} input channels, "
                         f"{cout} filters and part {part}")
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({cout},)")
    autocast = torch.is_autocast_enabled(input.device.type)
    for name, tensor in (("weight_1x1", weight_1x1), ("bias", bias)):
        if tensor is not None and tensor.numel():
            if tensor.device != input.device:
                raise ValueError(f"{name} is on {tensor.device}, expected the input's device ({input.device})")
            if tensor.dtype != input.dtype and not autocast:
                raise ValueError(f"{name} has dtype {tensor.dtype}, expected the input's dtype ({input.dtype})")
    for name, value in (("grad_input", grad_input), ("grad_weight_1x1", grad_weight_1x1)):
        if value not in GRAD_IMPLS:
            raise ValueError(f"{name} ({value!r}) must be one of {GRAD_IMPLS}")


def het_conv2d_triton(input: Tensor, weight_kxk: Tensor, weight_1x1: Optional[Tensor], bias: Optional[Tensor],
                      stride: tuple[int, int], part: int, *, grad_input: str = "triton",
                      grad_weight_1x1: str = "stock") -> Tensor:
    """2-D HetConv (k x k part + compact 1 x 1 part + bias) as one fused Triton kernel.

    Args:
        input (Tensor[batch, in_channels, height, width]): CUDA (or CPU under the interpreter);
            float16, bfloat16 or float32. Copied to channels-last first if it is not.
        weight_kxk (Tensor[out_channels, in_channels / part, kh, kw]): grouped k x k weights,
            odd ``kh`` and ``kw``, padding ``k // 2``.
        weight_1x1 (Tensor[out_channels, in_channels - in_channels / part] or None): the compact
            1 x 1 values, row ``j`` in increasing channel order; None when ``part == 1``.
        bias (Tensor[out_channels] or None): added in the kernel's epilogue.
        stride (tuple[int, int]): stride of both parts (an int is taken for both dimensions).
        part (int): ``P``; divides both channel counts.
        grad_input (str): ``"triton"`` (fused kernel at stride 1) or ``"stock"``; see the module
            docstring. Any stride > 1 uses the stock kernels.
        grad_weight_1x1 (str): ``"stock"`` (cuBLAS products) or ``"triton"``.

    Returns:
        Tensor[batch, out_channels, floor((height-1)/s)+1, floor((width-1)/s)+1]: channels-last
        strides, in the input's dtype (the autocast dtype under autocast). An empty batch returns
        an empty tensor without launching a kernel.

    Raises:
        TypeError, ValueError: see :func:`check_supported`; also shapes that do not fit ``part``
            and unknown ``grad_input`` / ``grad_weight_1x1`` values.

    Example:
        >>> x = torch.randn(2, 8, 6, 6, device="cuda")
        >>> het_conv2d_triton(x, torch.randn(4, 4, 3, 3, device="cuda"),
        ...                   torch.randn(4, 4, device="cuda"), None, (1, 1), 2).shape
        torch.Size([2, 4, 6, 6])
    """
    if isinstance(stride, int) and not isinstance(stride, bool):
        stride = (stride, stride)
    check_supported(input, weight_kxk, stride)
    _check_call(input, weight_kxk, weight_1x1, bias, part, grad_input, grad_weight_1x1)
    if weight_1x1 is not None and weight_1x1.numel() == 0:
        weight_1x1 = None
    return torch.ops.sparse_hetconv.het_conv2d_triton(input, weight_kxk, weight_1x1, bias, list(stride), part,
                                                      grad_input, grad_weight_1x1)


# -- the custom op --------------------------------------------------------------------------------
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


@torch.library.custom_op("sparse_hetconv::het_conv2d_triton", mutates_args=())
def _het_conv2d_op(input: Tensor, weight_kxk: Tensor, weight_1x1: Optional[Tensor], bias: Optional[Tensor],
                   stride: Sequence[int], part: int, grad_input: str, grad_weight_1x1: str) -> Tensor:
    # NHWC activations; k x k weights with contiguous input channels (no copy for channels-last
    # parameters, one small copy of the weights otherwise) so that the kernel's loads coalesce.
    x = input.contiguous(memory_format=torch.channels_last)
    weight = weight_kxk.contiguous(memory_format=torch.channels_last)
    bias = None if bias is None else bias.contiguous()  # the kernel reads bias[j] at unit stride
    return _kernels().hetconv_forward(x, weight, weight_1x1, bias, tuple(stride), part, _allow_tf32())


def _out_shape(input: Tensor, weight_kxk: Tensor, stride: Sequence[int]) -> tuple:
    batch, _, height, width = input.shape
    return (batch, weight_kxk.shape[0], (height - 1) // stride[0] + 1, (width - 1) // stride[1] + 1)


@_het_conv2d_op.register_fake
def _het_conv2d_fake(input, weight_kxk, weight_1x1, bias, stride, part, grad_input, grad_weight_1x1):
    return torch.empty(_out_shape(input, weight_kxk, stride), dtype=input.dtype, device=input.device,
                       memory_format=torch.channels_last)


@torch.library.custom_op("sparse_hetconv::het_conv2d_triton_grad_weight_1x1", mutates_args=())
def _grad_weight_1x1_op(grad: Tensor, input: Tensor, stride: Sequence[int], part: int) -> Tensor:
    x = input.contiguous(memory_format=torch.channels_last)
    return _kernels().grad_weight_1x1(grad, x, tuple(stride), part, _allow_tf32())


@_grad_weight_1x1_op.register_fake
def _grad_weight_1x1_fake(grad, input, stride, part):
    cin = input.shape[1]
    return input.new_empty((grad.shape[1], cin - cin // part))


def _setup_context(ctx, inputs, output) -> None:
    input, weight_kxk, weight_1x1, bias, stride, part, grad_input, grad_weight_1x1 = inputs
    ctx.save_for_backward(input, weight_kxk, weight_1x1)
    ctx.stride, ctx.part = tuple(stride), part
    ctx.impls = (grad_input, grad_weight_1x1)


def _rows(x: Tensor) -> Tensor:
    """``(pixels, channels)`` rows of an NCHW-shaped tensor (a view when it is channels-last)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _blocked(rows: Tensor, values: Tensor, part: int) -> Tensor:
    """The compact 1 x 1 product ``rows @ W^T``, ``2P`` products over contiguous channel slices.

    Args:
        rows (Tensor[pixels, C]): input rows; values (Tensor[F, C - C/P]): compact values.

    Returns:
        Tensor[pixels, F].
    """
    cin, nb = rows.shape[1], values.shape[0] // part
    mb = cin // part
    outs = []
    for g in range(part):
        w = values[g * nb:(g + 1) * nb]
        y = rows[:, :g * mb] @ w[:, :g * mb].t() if g else None
        if g < part - 1:
            after = rows[:, (g + 1) * mb:] @ w[:, g * mb:].t()
            y = after if y is None else y + after
        outs.append(y)
    return torch.cat(outs, dim=1)


def _transposed_1x1(weight_1x1: Tensor, part: int) -> Tensor:
    """Compact values of the transposed layer's 1 x 1 part.

    The transposed ``(M, N)`` matrix has the HetConv pattern of ``N`` inputs, ``M`` filters and the
    same ``P``, so it is compact again: a permutation of ``P (P - 1)`` blocks, each transposed.
    Its block ``(h, s)`` (filters of group ``h``, ``s``-th other group) holds original group
    ``g = s + [s >= h]``, whose compact block for channel block ``h`` is ``t = h - [h > g]``.

    Args:
        weight_1x1 (Tensor[N, M - M/P]): compact values of the layer.

    Returns:
        Tensor[M, N - N/P]: row ``c`` lists the transposed layer's filter ``c`` in increasing
        channel order.
    """
    cout, width = weight_1x1.shape
    nb, mb = cout // part, width // (part - 1)
    h = torch.arange(part, device=weight_1x1.device)[:, None]
    s = torch.arange(part - 1, device=weight_1x1.device)[None, :]
    g = s + (s >= h).long()
    t = h - (h > g).long()
    blocks = weight_1x1.reshape(part, nb, part - 1, mb).permute(0, 2, 3, 1)  # [g, t, i, jj]
    return blocks[g, t].permute(0, 2, 1, 3).reshape(part * mb, (part - 1) * nb)


def _grad_input(grad, input, weight_kxk, weight_1x1, stride, part, impl) -> Tensor:
    cin, cout = input.shape[1], weight_kxk.shape[0]
    kh, kw = weight_kxk.shape[2:]
    w1t = _transposed_1x1(weight_1x1, part) if weight_1x1 is not None else None
    if impl == "triton" and stride == (1, 1):
        nb, mb = cout // part, cin // part
        kxk_t = weight_kxk.reshape(part, nb, mb, kh, kw).transpose(1, 2).flip(-2, -1).reshape(cin, nb, kh, kw)
        return torch.ops.sparse_hetconv.het_conv2d_triton(grad, kxk_t, w1t, None, [1, 1], part, impl, "stock")
    out = torch.nn.grad.conv2d_input(input.shape, weight_kxk, grad, stride, (kh // 2, kw // 2), 1, part)
    if w1t is None:
        return out
    batch, _, ho, wo = grad.shape
    pointwise = _blocked(_rows(grad), w1t, part).view(batch, ho, wo, cin).permute(0, 3, 1, 2)
    # The 1 x 1 part read the input at the strided positions only.
    out[:, :, ::stride[0], ::stride[1]] += pointwise
    return out


def _grad_weight_1x1_stock(grad: Tensor, input: Tensor, stride: tuple[int, int], part: int) -> Tensor:
    rows = _rows(input[:, :, ::stride[0], ::stride[1]])
    grads = _rows(grad)
    cout, cin = grad.shape[1], input.shape[1]
    nb, mb = cout // part, cin // part
    blocks = []
    for g in range(part):
        dy = grads[:, g * nb:(g + 1) * nb].t()
        blocks.append(torch.cat([dy @ rows[:, :g * mb], dy @ rows[:, (g + 1) * mb:]], dim=1))
    return torch.cat(blocks, dim=0)


def _grad_weight_kxk(grad: Tensor, input: Tensor, weight_kxk: Tensor, stride) -> Tensor:
    kh, kw = weight_kxk.shape[2:]
    groups = input.shape[1] // weight_kxk.shape[1]
    if bf16_conv_is_wrong(input, tuple(stride)):
        grad, input = grad.float(), input.float()
    out = torch.nn.grad.conv2d_weight(input, weight_kxk.shape, grad, stride, (kh // 2, kw // 2), 1, groups)
    return out.to(weight_kxk.dtype)


def _backward(ctx, grad: Tensor):
    # ``loss.backward()`` inside the autocast region: the products below stay in the saved dtype.
    with torch.autocast(grad.device.type, enabled=False):
        return _backward_products(ctx, grad)


def _backward_products(ctx, grad: Tensor):
    input, weight_kxk, weight_1x1 = ctx.saved_tensors
    stride, part = ctx.stride, ctx.part
    impl_input, impl_1x1 = ctx.impls
    need = ctx.needs_input_grad
    grad_in = grad_kxk = grad_1x1 = grad_bias = None
    empty = grad.numel() == 0
    if need[0]:
        grad_in = input.new_zeros(input.shape) if empty else _grad_input(
            grad, input, weight_kxk, weight_1x1, stride, part, impl_input)
    if need[1]:
        grad_kxk = weight_kxk.new_zeros(weight_kxk.shape) if empty else _grad_weight_kxk(
            grad, input, weight_kxk, stride)
    if need[2] and weight_1x1 is not None:
        if empty:
            grad_1x1 = weight_1x1.new_zeros(weight_1x1.shape)
        elif impl_1x1 == "triton":
            grad_1x1 = torch.ops.sparse_hetconv.het_conv2d_triton_grad_weight_1x1(grad, input, list(stride), part)
        else:
            grad_1x1 = _grad_weight_1x1_stock(grad, input, stride, part)
    if need[3]:
        grad_bias = grad.sum((0, 2, 3))
    return grad_in, grad_kxk, grad_1x1, grad_bias, None, None, None, None


_het_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


# -- autocast -------------------------------------------------------------------------------------
# torch.library.register_autocast casts to one fixed dtype; F.conv2d casts to the dtype the
# autocast region asks for, so this rule reads it at call time. Like register_autocast, it casts
# the floating (not float64) tensors of the autocast device, then runs the op with autocast off.
_LIB = torch.library.Library("sparse_hetconv", "FRAGMENT")


def _register_autocast(device_type: str) -> None:
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def cast(t, dtype):
        if t is not None and t.is_floating_point() and t.device.type == device_type and t.dtype != torch.float64:
            return t.to(dtype)
        return t

    def kernel(keyset, input, weight_kxk, weight_1x1, bias, stride, part, grad_input, grad_weight_1x1):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return torch.ops.sparse_hetconv.het_conv2d_triton(
                cast(input, dtype), cast(weight_kxk, dtype), cast(weight_1x1, dtype), cast(bias, dtype),
                stride, part, grad_input, grad_weight_1x1)

    _LIB.impl("het_conv2d_triton", kernel, key, with_keyset=True)


for _device in ("cuda", "cpu"):
    _register_autocast(_device)
