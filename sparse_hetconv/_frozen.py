"""``torch.compile`` with Inductor's freezing for one model, leaving the process's settings alone.

Freezing folds the weights into the compiled graph as constants (what a deployed model gets, and
what Inductor's int8 lowering needs). It is a process-wide setting, ``torch._inductor.config.freezing``,
read when a graph is compiled: set globally, every later ``torch.compile`` in the process (a
training loop's, a test's) would freeze its weights too and go stale after the next optimizer step.
:class:`FrozenCompiled` applies it only around its own calls, where its graphs are compiled (the
first call and a recompilation for a new input shape).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FrozenCompiled"]


class FrozenCompiled(nn.Module):
    """``torch.compile(module, dynamic=False)`` whose graphs are compiled with freezing.

    An inference model: its weights are read once, at compilation; call it under ``torch.no_grad``.
    ``module`` stays reachable as ``.module`` (changing its weights needs a new FrozenCompiled).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        # Not a registered child: it wraps ``module`` (its parameters would appear twice).
        object.__setattr__(self, "_compiled", torch.compile(module, dynamic=False))

    def forward(self, *args, **kwargs):
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self._compiled(*args, **kwargs)
