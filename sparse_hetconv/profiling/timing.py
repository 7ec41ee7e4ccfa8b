"""Latency: warm-up calls, then interleaved rounds on ``torch.utils.benchmark``'s clock; medians.

Each call is timed with :func:`torch.utils.benchmark.timer`, the clock of
:class:`torch.utils.benchmark.Timer` (it synchronises the accelerator, where there is one, before
reading ``time.perf_counter``). ``Timer`` itself measures one statement at a time, each
measurement after warm-up calls of its own; here the variants being compared are interleaved,
round by round, so that a slow spell of a shared machine hits all of them alike and per-round
ratios between them can be taken.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping

from torch.utils.benchmark import timer

__all__ = ["interleaved_latency", "measure_latency"]


def measure_latency(fn: Callable[[], object], warmup: int = 3, repeats: int = 10) -> dict[str, float]:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Returns:
        dict: ``median_ms``, ``min_ms``, ``max_ms``, ``q1_ms``, ``q3_ms``, ``repeats`` and ``times_ms``.
    """
    return interleaved_latency({"fn": fn}, warmup, repeats)["fn"]


def interleaved_latency(fns: Mapping[str, Callable[[], object]], warmup: int = 2, repeats: int = 10,
                        progress: Callable[[], object] | None = None) -> dict[str, dict[str, float]]:
    """Time several callables in interleaved rounds; each round calls every one once.

    The order rotates from round to round, so neither position nor a slow spell of the machine
    favours one callable. ``warmup`` untimed calls of each come first.

    Args:
        fns: name -> callable taking no argument.
        warmup (int): untimed calls of each callable before the rounds.
        repeats (int): timed rounds (>= 1).
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
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = timer()
            fns[name]()
            times[name].append((timer() - start) * 1e3)
            if progress is not None:
                progress()
    result = {}
    for name, values in times.items():
        q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        result[name] = {"median_ms": statistics.median(values), "min_ms": min(values), "max_ms": max(values),
                        "q1_ms": q1, "q3_ms": q3, "repeats": repeats, "times_ms": values}
    return result
