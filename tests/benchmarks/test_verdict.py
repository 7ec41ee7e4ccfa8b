"""benchmarks.harness (the notebooks' tools): speed-ups with their spread, implausible timings
flagged, the comparisons against P, machine facts and glibc's malloc thresholds.

Hand-worked round times, compared exactly; one real measurement of a broken timing (a callable
that returns a cached result), whose margin is three orders of magnitude.
"""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.harness import compare, machine, verdict
from sparse_hetconv import SparseHetConv2d, count_macs, profiling
from sparse_hetconv.pattern import HetConvPattern

ROOT = Path(__file__).resolve().parents[2]


def _stats(**times):
    return {name: {"times_ms": list(values)} for name, values in times.items()}


@pytest.mark.parametrize("fast, slow, expected, median", [
    ([1.0, 1.0, 1.1, 0.9, 1.0], [2.0, 2.2, 2.0, 1.8, 2.0], "faster", 2.0),
    ([2.0, 2.2, 2.0, 1.8, 2.0], [1.0, 1.0, 1.1, 0.9, 1.0], "slower", 0.5),
    # ratios 0.8, 1.25, 1.0, 1.1, 0.9: quartiles 0.9 and 1.1 straddle 1
    ([1.0, 1.0, 1.0, 1.0, 1.0], [0.8, 1.25, 1.0, 1.1, 0.9], "no clear difference", 1.0),
])
def test_speedup_per_round(fast, slow, expected, median):
    result = verdict.speedup(_stats(new=fast, old=slow), "new", "old")
    assert result["verdict"] == expected and result["median"] == pytest.approx(median), result
    assert result["min"] <= result["q1"] <= result["median"] <= result["q3"] <= result["max"], result
    text = verdict.speedup_text("new", "old", result)
    expected = {"faster": "new is 2.00x faster than old", "slower": "new is 2.00x slower than old",
                "no clear difference": "new is not measurably faster or slower than old"}[expected]
    assert text.startswith(expected) and "quartiles of 5 rounds" in text, text


def test_speedup_uses_rounds_not_medians():
    """Medians alone say 'faster' (1.0 vs 1.5 ms); round by round the two were even, the
    machine slowed both down in the same rounds."""
    result = verdict.speedup(_stats(a=[1.0, 1.0, 1.0, 3.0, 3.0], b=[1.0, 1.0, 1.5, 3.0, 3.0]), "a", "b")
    assert result["verdict"] == "no clear difference" and result["median"] == 1.0, result


def test_speedup_argument_errors():
    with pytest.raises(KeyError, match="'c' is not among the timed callables"):
        verdict.speedup(_stats(a=[1.0], b=[1.0]), "c", "a")
    with pytest.raises(ValueError, match="'a' and 'b' were not timed in the same rounds \\(1 and 2 times\\)"):
        verdict.speedup(_stats(a=[1.0], b=[1.0, 2.0]), "a", "b")


def test_flag_implausible_against_the_flop_ideal_and_the_peak():
    rows = [{"form": "ok", "median_ms": 1.0, "over_ideal": 0.61},  # measured at 512 channels, 2 x 2
            {"form": "too fast", "median_ms": 1.0, "over_ideal": 0.11},  # the notebook's impossible timing
            {"form": "over peak", "median_ms": 1.0, "useful_macs": 1e9},  # 2000 GFLOP/s
            {"form": "under peak", "median_ms": 10.0, "useful_macs": 1e9},  # 200 GFLOP/s
            {"form": "not judged", "median_ms": 1.0}]
    flagged = verdict.flag_implausible(rows, peak_gflops=1000.0)
    assert [r["form"] for r in flagged] == ["too fast", "over peak"], flagged
    assert rows[1]["implausible"] == ("0.11x its FLOP-ideal: 9.1x the FLOP rate of the standard convolution timed "
                                      "beside it (flagged under 0.25x)")
    assert rows[2]["implausible"] == ("2000 GFLOP/s of useful work, over 1.5x this machine's measured float32 peak "
                                      "(1000 GFLOP/s)")
    assert rows[0]["implausible"] is None and rows[4]["implausible"] is None
    assert verdict.flag_implausible(rows) == [rows[1]], "without a peak only the FLOP-ideal is judged"
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match=r"floor \(.*\) must be in \(0, 1\]"):
            verdict.flag_implausible(rows, floor=bad)
    with pytest.raises(ValueError, match=r"peak_gflops \(-1\) must be a positive number"):
        verdict.flag_implausible(rows, peak_gflops=-1)


def test_a_broken_measurement_is_flagged(one_thread):
    """A 'kernel' that returns a cached output instead of computing: timed beside the standard
    convolution as latency_vs_part times its forms, it lands far under its FLOP-ideal."""
    layer = SparseHetConv2d(64, 64, 4).eval()
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False).eval()
    x = torch.randn(8, 64, 32, 32)
    with torch.no_grad():
        cached = layer(x)
        stats = profiling.interleaved_latency({"standard": lambda: conv(x), "cached": lambda: cached}, repeats=5)
    useful = count_macs(layer, tuple(x.shape), norm=False)
    ideal = stats["standard"]["median_ms"] * useful / count_macs(conv, tuple(x.shape), norm=False)
    rows = [{"form": name, **s, "over_ideal": s["median_ms"] / ideal, "useful_macs": useful}
            for name, s in stats.items() if name == "cached"]
    assert verdict.flag_implausible(rows) == rows, rows


def test_latency_vs_part_rows_carry_what_the_verdicts_need():
    rows = compare.latency_vs_part((4,), shape=(32, 32, 8), batch=2, repeats=2, warmup=0,
                                     forms=("standard_cl", "sparse_cl"))
    by_form = {r["form"]: r for r in rows}
    useful = HetConvPattern(32, 32, 4).useful_macs_per_pixel() * 2 * 8 * 8
    assert by_form["sparse_cl"]["useful_macs"] == useful
    assert by_form["standard_cl"]["useful_macs"] == 32 * 32 * 9 * 2 * 8 * 8
    assert len(by_form["sparse_cl"]["times_ms"]) == 2
    assert verdict.speedup(by_form, "sparse_cl", "standard_cl")["rounds"] == 2
    net = compare.latency_vs_part((4,), shape=None, batch=1, repeats=1, warmup=0, forms=("standard_cl", "sparse_cl"))
    macs = {r["form"]: r["useful_macs"] for r in net}
    assert macs["sparse_cl"] == count_macs(compare.vgg_training_step(part=4)["model"], (1, 3, 32, 32), norm=False)
    assert macs["standard_cl"] == count_macs(compare.vgg_training_step(part=1)["model"], (1, 3, 32, 32), norm=False)


def test_memory_vs_part_has_the_standard_baseline_and_a_resident_range(monkeypatch):
    from sparse_hetconv import count_params
    from sparse_hetconv.models import vgg16_cifar

    rows = compare.memory_vs_part((4,), batch=2, forms=("standard", "sparse"), peak=False)
    assert [(r["part"], r["form"]) for r in rows] == [(1, "standard"), (4, "sparse")], rows
    assert rows[0]["training"] == 12 * count_params(vgg16_cifar(part=1)), "float32 params + grads + momentum"
    runs = iter([300, 100, 200])  # three fresh processes' resident peaks (each one costs seconds)
    calls = []

    def fake_peak(builder, kwargs, path):
        assert builder == "benchmarks.harness.compare:vgg_training_step" and path == [str(ROOT)], (builder, path)
        calls.append(kwargs)
        return {"peak_bytes": next(runs), "tensor_peak_bytes": 42}

    monkeypatch.setattr(compare, "peak_training_memory", fake_peak)
    [row] = compare.memory_vs_part((4,), batch=2, forms=("standard",), repeats=3)
    assert calls == [{"part": 1, "form": "sparse", "batch": 2}] * 3, calls
    assert (row["peak_bytes"], row["peak_min_bytes"], row["peak_max_bytes"], row["peak_runs"]) == (200, 100, 300, 3)
    with pytest.raises(ValueError, match=r"forms \['dense'\] are not known"):
        compare.memory_vs_part((4,), forms=("dense",))


def test_busy_machine_warns_above_one_process_per_core():
    assert verdict.busy_machine({"load_average": 8.5, "cores": 2}) == (
        "this machine is busy (load average 8.5 on 2 cores): the timings below wait for other work and are not "
        "representative; rerun on a quiet machine")
    assert verdict.busy_machine({"load_average": 1.5, "cores": 2}) is None
    assert verdict.busy_machine({"load_average": None, "cores": 2}) is None, "no load average (not POSIX)"
    info = machine.machine_info()
    assert info["load_average"] is None or info["load_average"] >= 0, info


GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def _pinned_in_fresh_process(pin: bool):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    code = ("from benchmarks.harness import machine\n"
            f"ok = machine.pin_mmap_threshold() if {pin} else None\n"
            "print(ok, machine.mmap_threshold_pinned())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


@pytest.mark.skipif(not GLIBC, reason="mallopt thresholds are glibc's")
def test_malloc_thresholds_pin_and_the_check_tells_pinned_from_default():
    pinned_ok, pinned = _pinned_in_fresh_process(True)
    _, default = _pinned_in_fresh_process(False)
    assert pinned_ok == "True", "glibc must accept the thresholds"
    if pinned != "None":  # glibc >= 2.33 (mallinfo2) can check
        assert (pinned, default) == ("True", "False"), f"pinned {pinned}, default {default}"
    with pytest.raises(ValueError, match="threshold"):
        machine.pin_mmap_threshold(64 * 2 ** 20)
