"""Make generic FLOP counters count HetConv layers the way the paper does.

The paper counts multiply-accumulates (MACs) of the kernels that exist,
``N (k^2 M/P + M - M/P)`` per output pixel (:meth:`HetConvPattern.useful_macs_per_pixel`), whatever
form or backend computes it; generic counters count what *executes*, and miss what they have no
formula for (docs/compatibility.md has the per-tool, per-backend table):

* ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs, two per MAC): importing this module registers
  formulas for the operations of HetConv layers it would count as zero
  (:func:`register_flop_counter_formulas`; ``import sparse_hetconv`` arranges it lazily).
* fvcore (``FlopCountAnalysis``, MACs): :func:`fvcore_handles` / :func:`fvcore_analysis` count each
  HetConv layer by the paper, for every backend and both forms.
* ptflops (``get_model_complexity_info``, MACs): :func:`ptflops_hooks` does the same through
  ``custom_modules_hooks`` (without them a sparse layer counts as zero, a masked one as its ``gwc``).

fvcore and ptflops are optional (the ``dev`` extra); they are imported only when used.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from ._checks import check_model
from ._flop_formulas import _macs, register_flop_counter_formulas
from .masked import MaskedHetConv2d, MaskedHetConv3d, _MaskedHetConvNd
from .sparse import SparseHetConv2d, SparseHetConv3d, _SparseHetConvNd

__all__ = ["fvcore_analysis", "fvcore_handles", "ptflops_hooks", "register_flop_counter_formulas"]

_HETCONV = (_MaskedHetConvNd, _SparseHetConvNd)


register_flop_counter_formulas()  # idempotent; usually already done by ``import sparse_hetconv``


# -- fvcore ----------------------------------------------------------------------------------------
def _pixels(shape) -> int:
    """Output pixels (batch times spatial) of an ``(batch, channels, *spatial)`` output shape."""
    return shape[0] * math.prod(shape[2:])


def fvcore_handles(model: nn.Module) -> dict[str, Callable]:
    """fvcore operator handles that count the HetConv layers of ``model`` the paper's way.

    fvcore traces the model with ``torch.jit`` and calls a handle per operation, knowing which
    module ran it. The handles returned here:

    * inside a sparse HetConv layer, count the whole layer, ``N (k^2 m + M - m)`` MACs per output
      pixel, on its k x k convolution, and every other operation of the layer (the 1 x 1 part of
      any backend: a dense or grouped 1 x 1 convolution, matrix products, the torch.sparse product)
      as zero;
    * the operator ``sparse_hetconv::het_conv2d`` (the ``fused`` and ``triton`` backends, and
      ``auto`` where it picks them): the layer's MACs, wherever it is called;
    * inside a masked HetConv layer, count its 1 x 1 convolution as ``N (M - m)`` MACs per pixel
      (the zeroed block diagonal left out; ``gwc`` keeps fvcore's own count);
    * everywhere else, defer to fvcore's own handle for the operation.

    Args:
        model (nn.Module): the model that will be analysed (the handles look its layers up by the
            names fvcore gives them, so they belong to this model).

    Returns:
        dict: operator name -> handle, for ``FlopCountAnalysis(model, x).set_op_handle(**handles)``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ImportError: fvcore is not installed.

    Example:
        >>> from fvcore.nn import FlopCountAnalysis
        >>> model, x = vgg16_cifar(part=4).eval(), torch.randn(1, 3, 32, 32)
        >>> analysis = FlopCountAnalysis(model, x).set_op_handle(**fvcore_handles(model))
        >>> analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)  # doctest: +ELLIPSIS
        <...>
        >>> round(analysis.total() / 1e6)  # MACs, HetConv layers by the paper's convention (106 M)
        106
    """
    check_model(model)
    from fvcore.nn import jit_handles

    layers = {name: module for name, module in model.named_modules() if isinstance(module, _HETCONV)}

    def owner(outputs) -> nn.Module | None:
        # fvcore scopes every traced operation with the names of the modules that called it;
        # the last one is the module that ran it.
        scope = outputs[0].node().scopeName().split("/")[-1]
        return layers.get(scope)

    def conv(inputs, outputs):
        layer = owner(outputs)
        if layer is None:
            return jit_handles.conv_flop_jit(inputs, outputs)
        p = layer.pattern
        weight = jit_handles.get_shape(inputs[1])
        out = jit_handles.get_shape(outputs[0])
        if isinstance(layer, _MaskedHetConvNd):
            # The masked layer's own convolution is pwc's (gwc runs in its own scope).
            return Counter({"conv": _pixels(out) * p.out_channels * p.num_1x1})
        kxk_shape = [p.out_channels, p.block_in, *p.kernel_size]
        is_param = inputs[1].node().kind() == "prim::Param"
        if weight == kxk_shape and (is_param or any(k > 1 for k in p.kernel_size)):
            return Counter({"conv": _pixels(out) * p.useful_macs_per_pixel()})
        return Counter({"conv": 0})  # a 1 x 1 convolution of the sparse layer's backend: already counted above

    def inside_sparse(default: Callable) -> Callable:
        def handle(inputs, outputs):
            if isinstance(owner(outputs), _SparseHetConvNd):
                return 0  # part of the layer's 1 x 1 computation, counted on its k x k convolution
            return default(inputs, outputs)

        return handle

    def operator(inputs, outputs):
        # torch.ops.sparse_hetconv.het_conv2d (backend "fused"/"triton"): the whole layer, one call.
        x, w = jit_handles.get_shape(inputs[0]), jit_handles.get_shape(inputs[1])
        out = jit_handles.get_shape(outputs[0])
        return Counter({"conv": _macs(out[0], out[2:], out[1], x[1], x[1] // w[1], w[2:])})

    def csr_matmul(inputs, outputs):
        # Outside a sparse layer (a direct call of het_conv): the stored values times the columns.
        values, cols = jit_handles.get_shape(inputs[0]), jit_handles.get_shape(inputs[1])
        return math.prod(values) * cols[-1]

    return {
        "aten::_convolution": conv,
        "aten::matmul": inside_sparse(jit_handles.matmul_flop_jit),
        "aten::mm": inside_sparse(jit_handles.matmul_flop_jit),
        "aten::addmm": inside_sparse(jit_handles.addmm_flop_jit),
        "aten::addmm_": inside_sparse(jit_handles.addmm_flop_jit),
        "aten::bmm": inside_sparse(jit_handles.bmm_flop_jit),
        "prim::PythonOp._CsrMatmul": inside_sparse(csr_matmul),
        "sparse_hetconv::het_conv2d": operator,
    }


def fvcore_analysis(model: nn.Module, inputs):
    """``fvcore.nn.FlopCountAnalysis`` of ``model`` with :func:`fvcore_handles` set.

    Args:
        model (nn.Module): the model.
        inputs (Tensor or tuple of Tensor): what ``model`` is called with.

    Returns:
        fvcore.nn.FlopCountAnalysis: lazily evaluated; ``.total()`` and ``.by_module()`` give MACs.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ImportError: fvcore is not installed.
    """
    handles = fvcore_handles(model)
    from fvcore.nn import FlopCountAnalysis

    return FlopCountAnalysis(model, inputs).set_op_handle(**handles)


# -- ptflops ---------------------------------------------------------------------------------------
def _ptflops_hook(module: nn.Module, input, output: torch.Tensor) -> None:
    """ptflops forward hook: the paper's MACs of the call, plus a bias as ptflops counts it."""
    macs = _pixels(output.shape) * module.pattern.useful_macs_per_pixel()
    bias = module.bias if isinstance(module, _SparseHetConvNd) else module.gwc.bias
    if bias is not None:
        macs += output.numel()
    module.__flops__ += int(macs)


def ptflops_hooks() -> dict[type, Callable]:
    """``custom_modules_hooks`` for ptflops' ``get_model_complexity_info`` (``pytorch`` backend).

    Each HetConv layer (both forms, 2-D and 3-D) then counts ``N (k^2 m + M - m)`` MACs per output
    pixel, plus one per output element for a bias (ptflops' convention for ``nn.Conv2d``), and the
    masked layer's ``gwc``/``pwc`` children are not counted again.

    Returns:
        dict: layer type -> hook.

    Example:
        >>> from ptflops import get_model_complexity_info
        >>> model = vgg16_cifar(part=4).eval()
        >>> macs, params = get_model_complexity_info(model, (3, 32, 32), as_strings=False,
        ...     print_per_layer_stat=False, custom_modules_hooks=ptflops_hooks())
        >>> params == count_params(model)
        True
    """
    return {cls: _ptflops_hook for cls in (SparseHetConv2d, SparseHetConv3d, MaskedHetConv2d, MaskedHetConv3d)}
