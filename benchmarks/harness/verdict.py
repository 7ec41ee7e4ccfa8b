"""Reading timings honestly: speed-ups with their spread, and timings no kernel can achieve.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. A HetConv layer does fewer
multiply-accumulates than the standard convolution it replaces; whether it is *faster* is a
measurement, and a measurement has a spread. :func:`speedup` compares two callables timed by
:func:`~sparse_hetconv.profiling.interleaved_latency` round by round (both ran in the same round, so
a slow spell of the machine hits both) and says "faster" or "slower" only when the quartiles of
the per-round ratio agree. :func:`flag_implausible` marks timings faster than the FLOP count
allows: a time far under its FLOP-ideal (the standard convolution's time, timed beside it, scaled
by the useful MACs) or above the machine's measured float32 peak is a broken measurement (a
result reused, work skipped, a timer around nothing), not a fast kernel.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping

__all__ = ["IDEAL_FLOOR", "PEAK_MARGIN", "busy_machine", "flag_implausible", "speedup", "speedup_text"]

#: A time under this fraction of its FLOP-ideal is flagged: the layer would compute its useful
#: MACs at more than 1 / IDEAL_FLOOR times the FLOP rate of the standard convolution timed beside
#: it. Measured HetConv kernels reach 0.6x at shapes where oneDNN's standard convolution is slow
#: (512 channels at 2 x 2), so the floor leaves room for that, not for a 9x faster kernel.
IDEAL_FLOOR = 0.25
#: Useful GFLOP/s above this multiple of the machine's measured float32 peak are flagged.
PEAK_MARGIN = 1.5


def speedup(stats: Mapping[str, Mapping], name: str, baseline: str) -> dict:
    """How much faster ``name`` ran than ``baseline`` in :func:`interleaved_latency`'s rounds.

    Args:
        stats: :func:`~sparse_hetconv.profiling.interleaved_latency`'s result (or rows with
            ``times_ms`` in round order), holding ``name`` and ``baseline``.
        name, baseline (str): the two callables.

    Returns:
        dict: the per-round ratio ``baseline time / name time`` (above 1: ``name`` is faster):
        ``median``, ``q1``, ``q3``, ``min``, ``max``, ``rounds`` and ``verdict``: ``"faster"``
        when its first quartile is above 1, ``"slower"`` when its third quartile is below 1,
        else ``"no clear difference"``.

    Raises:
        KeyError: ``name`` or ``baseline`` is not in ``stats``.
        ValueError: their rounds differ in number (not timed together).
    """
    for key in (name, baseline):
        if key not in stats:
            raise KeyError(f"{key!r} is not among the timed callables {sorted(stats)}")
    mine, theirs = stats[name]["times_ms"], stats[baseline]["times_ms"]
    if len(mine) != len(theirs) or not mine:
        raise ValueError(f"{name!r} and {baseline!r} were not timed in the same rounds ({len(mine)} and "
                         f"{len(theirs)} times)")
    ratios = [b / a for a, b in zip(mine, theirs)]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    verdict = "faster" if q1 > 1 else "slower" if q3 < 1 else "no clear difference"
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3, "min": min(ratios), "max": max(ratios),
            "rounds": len(ratios), "verdict": verdict}


def speedup_text(name: str, baseline: str, result: Mapping) -> str:
    """One sentence for :func:`speedup`'s ``result``, e.g. ``"sparse_cl is 1.45x faster than
    standard_cl (per-round ratio 1.40-1.51, quartiles of 9 rounds)"``."""
    spread = f"(per-round ratio {result['q1']:.2f}-{result['q3']:.2f}, quartiles of {result['rounds']} rounds)"
    if result["verdict"] == "faster":
        return f"{name} is {result['median']:.2f}x faster than {baseline} {spread}"
    if result["verdict"] == "slower":
        return f"{name} is {1 / result['median']:.2f}x slower than {baseline} {spread}"
    return f"{name} is not measurably faster or slower than {baseline} {spread}"


def flag_implausible(rows: list[dict], peak_gflops: float | None = None, floor: float = IDEAL_FLOOR) -> list[dict]:
    """Mark timings that cannot be real; returns the rows marked.

    Each row gets ``implausible``: None, or the reason: a time under ``floor`` times its
    FLOP-ideal (``over_ideal``), or, with ``peak_gflops`` (e.g.
    :func:`~sparse_hetconv.profiling.sgemm_gflops`), useful work (``2 * useful_macs``) done at
    more than :data:`PEAK_MARGIN` times that peak. Rows without these fields are not judged.

    Args:
        rows (list of dict): with ``median_ms`` and ``over_ideal`` and / or ``useful_macs``
            (:func:`~sparse_hetconv.profiling.latency_vs_part`'s rows, the benchmarks' rows).
        peak_gflops (float, optional): this machine's float32 peak at the threads timed.
        floor (float): the lowest plausible ``over_ideal``.

    Raises:
        ValueError: ``floor`` is not in (0, 1], or ``peak_gflops`` is not positive.
    """
    if not 0 < floor <= 1:
        raise ValueError(f"floor ({floor!r}) must be in (0, 1]: a time under floor x its FLOP-ideal is flagged")
    if peak_gflops is not None and not peak_gflops > 0:
        raise ValueError(f"peak_gflops ({peak_gflops!r}) must be a positive number (GFLOP/s) or None")
    for row in rows:
        reasons = []
        ratio = row.get("over_ideal")
        if ratio is not None and ratio < floor:
            reasons.append(f"{ratio:.2f}x its FLOP-ideal: {1 / ratio:.1f}x the FLOP rate of the standard convolution "
                           f"timed beside it (flagged under {floor:g}x)")
        if peak_gflops and row.get("useful_macs") and row.get("median_ms"):
            gflops = 2 * row["useful_macs"] / (row["median_ms"] * 1e-3) / 1e9
            if gflops > PEAK_MARGIN * peak_gflops:
                reasons.append(f"{gflops:.0f} GFLOP/s of useful work, over {PEAK_MARGIN:g}x this machine's measured "
                               f"float32 peak ({peak_gflops:.0f} GFLOP/s)")
        row["implausible"] = "; ".join(reasons) or None
    return [row for row in rows if row["implausible"]]


def busy_machine(info: Mapping) -> str | None:
    """A warning when other work competes for the cores (``info``: :func:`machine_info`): a load
    average above the core count makes every multi-threaded timing wait for descheduled threads
    (measured: VGG-16 at batch 1 took 540 ms with 2 threads and 15 ms with 1 on 2 cores at load 8)."""
    load, cores = info.get("load_average"), info.get("cores")
    if load is None or not cores or load <= cores:
        return None
    return (f"this machine is busy (load average {load:.1f} on {cores} cores): the timings below wait for other "
            "work and are not representative; rerun on a quiet machine")
