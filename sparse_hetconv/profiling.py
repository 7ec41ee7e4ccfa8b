"""Small, honest measuring tools: latency medians and parameter bytes.

Used by the demo, the benchmarks and the notebooks. Timings warm up first, use
``time.perf_counter`` and synchronise CUDA when the tensors live there.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["measure_latency", "parameter_bytes"]


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(fn: Callable[[], object], warmup: int = 3, repeats: int = 10,
                    device: torch.device | str | None = None) -> dict[str, float]:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Returns:
        dict: ``median_ms``, ``min_ms``, ``max_ms`` and ``repeats``.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "repeats": repeats}


def parameter_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters (buffers excluded)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
