"""The measuring helpers of sparse_hetconv.profiling: timing, malloc tuning, memory accounting.

No timing is ever asserted: only call counts and order, and exact byte counts.
"""

import os
import platform
import subprocess
import sys

import pytest
import torch

from sparse_hetconv import count_params, profiling


def test_interleaved_latency_and_its_argument_checks():
    calls = []
    stats = profiling.interleaved_latency({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                          warmup=1, repeats=3)
    assert set(stats) == {"a", "b"} and calls.count("a") == 4 and calls.count("b") == 4
    assert calls[2:4] == ["a", "b"] and calls[4:6] == ["b", "a"], "rounds must rotate the order"
    assert all(s["min_ms"] <= s["median_ms"] <= s["max_ms"] for s in stats.values())
    with pytest.raises(ValueError, match="repeats >= 1"):
        profiling.interleaved_latency({"a": lambda: None}, repeats=0)


GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def _pinned_in_fresh_process(pin: bool):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    code = ("from sparse_hetconv.profiling import malloc\n"
            f"ok = malloc.pin_mmap_threshold() if {pin} else None\n"
            "print(ok, malloc.mmap_threshold_pinned())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
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
        profiling.pin_mmap_threshold(64 * 2 ** 20)


def test_state_bytes_counts_parameters_gradients_and_momentum():
    built = profiling.vgg_training_step(part=4, batch=2)
    built["step"]()
    state = profiling.state_bytes(built["model"], built["optimizer"])
    params = 4 * count_params(built["model"])
    assert state["params"] == state["grads"] == state["optimizer"] == params
    assert state["training"] == 3 * params


def test_peak_training_memory_rejects_bad_builders():
    with pytest.raises(ValueError, match="module:function"):
        profiling.peak_training_memory("no_colon")
    with pytest.raises(RuntimeError, match="failed"):
        profiling.peak_training_memory("sparse_hetconv.profiling.compare:does_not_exist")


def test_tensor_peak_bytes_counts_live_storages_exactly():
    def step():
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 8000 live
        del a
        c = b + 1  # a was freed first: 8000 live again
        return c

    assert profiling.tensor_peak_bytes(step) == 8000
    layer = torch.nn.Linear(10, 10)
    held = sum(p.numel() * 4 for p in layer.parameters())
    assert profiling.tensor_peak_bytes(lambda: None, layer) == held, "the model's parameters count from the start"
