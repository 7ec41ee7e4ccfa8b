"""Prepared 1 x 1 weights of one layer, reused across calls that need no gradient."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._common import eager_tensor

__all__ = ["WeightCache"]


class WeightCache:
    """Prepared 1 x 1 weights of one layer (a scattered dense matrix, shifted grouped weights).

    An entry is keyed by the values' storage address, version counter, dtype, device and shape, so
    any in-place update (an optimizer step, ``load_state_dict``, writes under ``torch.no_grad()``)
    or move invalidates it. The entry keeps the values it was built from alive, so no other tensor
    can take over their address while it is cached (``load_state_dict(assign=True)`` twice between
    calls, ``.double().float()``). Calls that need a gradient never use it: they rebuild the
    prepared weight inside autograd. Nothing is cached, and every call builds afresh, where a
    storage address or a version means nothing: inference tensors (made under
    ``torch.inference_mode()``, they have no version counter), fake, meta and ``torch.func``-wrapped
    tensors, and graph capture (``torch.compile``, ``torch.export``, ``torch.jit.trace``, which
    would otherwise record a prepared weight as a constant). Copies and pickles start empty.

    Writes through ``.data`` (``weight.data.mul_(2)``) bypass the version counter, as they bypass
    autograd; after one, call :meth:`clear` (a change of mode, ``module.train()`` after
    ``eval()`` or the reverse, does; a repeated ``eval()`` keeps the entries).
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, Tensor, Tensor]] = {}

    def get(self, kind: str, values: Tensor, build: Callable[[Tensor], Tensor]) -> Tensor:
        """The prepared weight ``build(values)`` for ``kind``, rebuilt only when ``values`` changed."""
        if values.is_inference() or not eager_tensor(values):
            with torch.no_grad():
                return build(values.detach())
        key = (values.data_ptr(), values._version, values.dtype, values.device, tuple(values.shape))
        entry = self._entries.get(kind)
        if entry is not None and entry[0] == key:
            return entry[1]
        # A normal tensor even when the call runs under inference_mode: a later call with autograd
        # must be able to use (and save) whatever was built from it.
        with torch.inference_mode(False), torch.no_grad():
            source = values.detach()
            prepared = build(source)
        self._entries[kind] = (key, prepared, source)
        return prepared

    def clear(self) -> None:
        """Drop every prepared weight."""
        self._entries.clear()

    def __getstate__(self) -> dict:
        # Copies and pickles start empty: the entries are keyed by this process's storage
        # addresses, and would add a dense N x M matrix per layer to every saved model.
        return {"_entries": {}}

    def nbytes(self) -> int:
        """Bytes held by the prepared weights."""
        return sum(t.numel() * t.element_size() for _, t, _ in self._entries.values())
