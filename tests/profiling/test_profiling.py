"""The measuring tools of sparse_hetconv.profiling: timing and memory accounting.

No timing is ever asserted: only call counts and order, and exact byte counts.
"""

import pytest
import torch

from benchmarks.harness.compare import vgg_training_step
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
    calls.clear()
    single = profiling.measure_latency(lambda: calls.append("f"), warmup=2, repeats=3)
    assert len(calls) == 5 and single["repeats"] == 3 and single["min_ms"] <= single["median_ms"] <= single["max_ms"]


def test_state_bytes_counts_parameters_gradients_and_momentum():
    built = vgg_training_step(part=4, batch=2)
    built["step"]()
    state = profiling.state_bytes(built["model"], built["optimizer"])
    params = 4 * count_params(built["model"])
    assert state["params"] == state["grads"] == state["optimizer"] == params
    assert state["training"] == 3 * params


def test_peak_training_memory_rejects_bad_builders():
    with pytest.raises(ValueError, match="module:function"):
        profiling.peak_training_memory("no_colon")
    with pytest.raises(RuntimeError, match="failed"):
        profiling.peak_training_memory("sparse_hetconv.profiling.memory:does_not_exist")


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
