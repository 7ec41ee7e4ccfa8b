"""The backends that compute a HetConv layer, one module each, and their registry.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. Every backend computes the
same numbers (docs/design.md §5); they differ only in speed, which depends on the call's shape,
part, device, dtype and memory format:

* ``dense`` (:mod:`.dense`): the compact values scattered into a zero ``N x M`` matrix, one 1 x 1
  convolution (the masked form's own kernel).
* ``grouped`` (:mod:`.grouped`): ``P - 1`` grouped 1 x 1 convolutions, one per block offset.
* ``blocked`` (:mod:`.blocked`): two matrix products per group over contiguous channel slices.
* ``torch_sparse`` (:mod:`.torch_sparse`): the literal torch.sparse CSR matrix times the input.
* ``fused`` (:mod:`.fused`): the registered operator :mod:`sparse_hetconv.ops` (compiled CPU
  kernels, the Triton kernel on CUDA, stock operations elsewhere) over only the kernels that exist,
  forward and backward; 3-D calls and ``torch.func`` transforms resolve to ``blocked``.
* ``triton``: the same operator with its Triton kernel required (CUDA; on the CPU under Triton's
  interpreter only). ``import sparse_hetconv`` does not load triton.

Each is a function ``compute(input, weight_kxk, weight_1x1, bias, call)`` computing the whole
layer for ``part > 1``; :class:`Call` holds the call's geometry and what the dispatcher found out
about it once (whether autograd records it, whether its tensors are ordinary eager ones). Every call
reads the parameters as they are: nothing derived from them (a scattered matrix, packed panels)
outlives the call, so no way of writing the weights (optimizer steps, fused or not, ``.data``,
``load_state_dict``, ``torch.func.functional_call``) can be missed. ``"auto"`` is not a backend: it is resolved to
one of these by :func:`sparse_hetconv.autotune.choose`, in one place
(:func:`sparse_hetconv.functional.dispatch`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import blocked, dense, fused, grouped, torch_sparse
from ._common import Call

__all__ = ["BACKENDS", "CONCRETE", "Call", "available", "check_backend", "get"]



_REGISTRY: dict[str, Callable] = {
    "dense": dense.compute,
    "grouped": grouped.compute,
    "blocked": blocked.compute,
    "torch_sparse": torch_sparse.compute,
    "fused": fused.compute,
    "triton": fused.triton,
}
#: The backends, in the order the cost model and the tests list them.
CONCRETE = tuple(_REGISTRY)
#: Every value a layer's ``backend`` accepts.
BACKENDS = ("auto",) + CONCRETE


def check_backend(value: object) -> str:
    """Return ``value`` if it names a backend (or ``"auto"``), else raise ``ValueError``."""
    if not isinstance(value, str) or value not in BACKENDS:
        raise ValueError(f"backend ({value!r}) must be one of {BACKENDS}")
    return value


def get(name: str) -> Callable:
    """The ``compute`` function of the concrete backend ``name``."""
    return _REGISTRY[name]


def available(name: str, device: torch.device | str = "cpu") -> bool:
    """Whether backend ``name`` can run on ``device`` here: the stock-kernel ones run anywhere, and so
    does ``fused`` (its compiled kernel where :func:`.fused.runs` says, ``blocked`` elsewhere);
    ``triton`` needs the triton package and a CUDA device, or Triton's interpreter on the CPU."""
    check_backend(name)
    if name != "triton":
        return True
    from .. import ops

    return ops.triton_kernel(device)
