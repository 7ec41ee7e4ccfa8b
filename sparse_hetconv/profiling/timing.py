"""Latency: warm up, ``time.perf_counter``, CUDA synchronisation, interleaved rounds, medians.

Timings interleave the variants being compared (so a slow spell of a shared machine hits all of
them alike) and report medians and quartiles.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch

__all__ = ["interleaved_latency", "measure_latency", "sync"]


def sync(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (CUDA only; a no-op elsewhere)."""
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
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "repeats": repeats}


def interleaved_latency(fns: Mapping[str, Callable[[], object]], warmup: int = 2, repeats: int = 10,
                        device: torch.device | str | None = None,
                        progress: Callable[[], object] | None = None) -> dict[str, dict[str, float]]:
    """Time several callables in interleaved rounds; each round calls every one once.

    The order rotates from round to round, so neither position nor a slow spell of the machine
    favours one callable. ``warmup`` untimed calls of each come first.

    Args:
        fns: name -> callable taking no argument.
        warmup (int): untimed calls of each callable before the rounds.
        repeats (int): timed rounds (>= 1).
        device: synchronised around each call when it is a CUDA device.
        progress (callable, optional): called after each timed call (e.g. ``tqdm.update``).

    Returns:
        dict: name -> ``median_ms``, ``min_ms``, ``max_ms``, ``q1_ms``, ``q3_ms``, ``repeats`` and
        ``times_ms`` (the timed calls in round order: entry ``r`` of every callable is round ``r``,
        so per-round ratios between callables can be taken).

    Raises:
        ValueError: ``repeats < 1`` or no callable.
    """
    if repeats < 1 or not fns:
        raise ValueError(f"interleaved_latency needs repeats >= 1 and at least one callable, got "
                         f"repeats={repeats} and {len(fns)} callables")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
            if progress is not None:
                progress()
    result = {}
    for name, values in times.items():
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        result[name] = {"median_ms": statistics.median(values), "min_ms": min(values), "max_ms": max(values),
                        "q1_ms": quartiles[0], "q3_ms": quartiles[2], "repeats": repeats, "times_ms": values}
    return result
