"""FlopCounterMode formulas for the operations of HetConv layers it has none for.

``torch.utils.flop_counter`` imports triton where it is installed (about 0.3 s), so
``import sparse_hetconv`` does not import it: :func:`register_when_imported` registers the formulas
at once if the counter is already imported, else right after anything imports it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

import torch

__all__ = ["register_flop_counter_formulas", "register_when_imported"]

_COUNTER = "torch.utils.flop_counter"


def _macs(batch, out_hw, cout, cin, part, kernel_size) -> int:
    """The multiply-accumulates of the kernels that exist (docs/design.md §6)."""
    m = cin // part
    return batch * out_hw[0] * out_hw[1] * cout * (m * kernel_size[0] * kernel_size[1] + cin - m)


def register_flop_counter_formulas() -> None:
    """Teach ``FlopCounterMode`` the operations of HetConv layers it has no formula for.

    * ``torch.ops.sparse_hetconv.het_conv2d`` and its two backward operators: the multiply-adds of
      the kernels that exist (``2 * MACs``, as the counter counts a convolution), whichever kernel
      computes the call.

    * ``torch.ops.mkldnn._convolution_pointwise_.binary``: without autograd on the CPU the
      ``dense`` backend adds its 1 x 1 convolution straight into the k x k output with it. Counted
      as the convolution it is (``2 N M`` FLOPs per output pixel: the dense matrix's zeros execute).
    * ``aten.addmm_``: the ``blocked`` and ``dense`` backends' products on channels-last inputs,
      added in place into the output. Counted like ``aten.addmm`` (``2 n k`` FLOPs per output
      element).

    Without them the counter silently counts those operations as zero. Idempotent; runs by itself
    when ``torch.utils.flop_counter`` is imported after ``sparse_hetconv``.
    """
    from torch.utils.flop_counter import conv_flop_count, flop_registry, mm_flop, register_flop_formula

    def fused_conv_flop(other_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return conv_flop_count(x_shape, w_shape, other_shape)

    def inplace_addmm_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return mm_flop(a_shape, b_shape)

    def het_conv_flop(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * _macs(out_shape[0], out_shape[2:], out_shape[1], input_shape[1],
                         input_shape[1] // weight_shape[1], weight_shape[2:])

    def grad_input_flop(grad_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * _macs(grad_shape[0], grad_shape[2:], grad_shape[1], out_shape[1],
                         out_shape[1] // weight_shape[1], weight_shape[2:])

    def grad_weight_flop(grad_shape, input_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
        return 2 * _macs(grad_shape[0], grad_shape[2:], grad_shape[1], input_shape[1],
                         input_shape[1] // out_shape[0][1], kernel_size)

    ops = torch.ops.sparse_hetconv
    for packet, formula in ((getattr(torch.ops.mkldnn, "_convolution_pointwise_", None), fused_conv_flop),
                            (torch.ops.aten.addmm_, inplace_addmm_flop), (ops.het_conv2d, het_conv_flop),
                            (ops.het_conv2d_grad_input, grad_input_flop),
                            (ops.het_conv2d_grad_weight, grad_weight_flop)):
        if packet is not None and packet not in flop_registry:
            register_flop_formula(packet)(formula)


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``torch.utils.flop_counter`` with the normal finders and registers after it executes."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _COUNTER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        register_flop_counter_formulas()


def register_when_imported() -> None:
    """Register the formulas now if the counter is imported, else as soon as it is."""
    if _COUNTER in sys.modules:
        register_flop_counter_formulas()
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
