"""The benchmark tooling: a tiny run of ``sparse-hetconv bench`` and the measuring helpers.

No timing is ever asserted: only that every number exists, is finite, and that the exact
quantities (outputs, training-state bytes) are what they must be.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_hetconv import count_params, profiling
from sparse_hetconv.models import vgg16_cifar

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    docs = out / "performance.md"
    argv = ["bench", "--parts", "2", "--batch", "2", "--repeats", "1", "--warmup", "1", "--levels", "layer",
            "--shapes", "1", "--no-profile", "--variants", "standard_cl", "published", "masked_cl",
            "sparse_grouped_cl", "sparse_auto_cl", "--out", str(out), "--docs", str(docs)]
    # A separate process: the benchmark sets process-wide state (threads, malloc, denormals).
    proc = subprocess.run([sys.executable, "-m", "sparse_hetconv", *argv], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "bench.json").read_text())


def test_bench_writes_json_tables_plot_and_docs(tiny_run):
    out, result = tiny_run
    for name in ("bench.md", "layers.md", "profiles.md", "latency_vs_p.png", "performance.md",
                 "performance_latency_vs_p.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, f"{name} was not written"
    assert result["machine"]["threads"] == torch.get_num_threads()
    assert result["machine"]["cpu"], "the machine must be named in the output"
    text = (out / "bench.md").read_text()
    assert "## Targets" in text and "threads" in text and "sparse-hetconv bench" in text


def test_bench_rows_are_complete_and_checked(tiny_run):
    _, result = tiny_run
    timed = [r for r in result["rows"] if "median_ms" in r]
    modes = {r["mode"] for r in timed}
    assert modes == {"forward_b1", "forward_b2", "train_b2"}, modes
    variants = {r["variant"] for r in timed}
    assert {"published", "masked_cl", "sparse_auto_cl", "standard_cl"} <= variants
    for row in timed:
        assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0
        assert row["vs_published"] > 0 and row["over_ideal"] > 0 and row["gflops"] > 0
    auto = [r for r in timed if r["variant"] == "sparse_auto_cl"]
    assert all(r["backend"] in ("dense", "grouped") for r in auto), "auto's resolved backend must be recorded"
    errors = result["checks"][0]["rel_error"]
    assert errors and max(errors.values()) < 1e-3, f"variants disagree: {errors}"


def test_bench_memory_training_state_is_exactly_the_hetconv_count(tiny_run):
    _, result = tiny_run
    memory = {m["variant"]: m for m in result["memory"]}
    assert {"published", "masked_cl", "sparse_auto_cl"} <= set(memory), memory.keys()
    sparse, masked, published = memory["sparse_auto_cl"], memory["masked_cl"], memory["published"]
    assert sparse["state"]["training"] == 3 * 4 * count_params(vgg16_cifar(part=2))
    assert masked["state"]["training"] > sparse["state"]["training"], "the masked form stores its zeros"
    assert published["state"]["buffers"] > masked["state"]["buffers"], "the published form keeps float masks"
    assert all(m["peak_bytes"] > 0 for m in memory.values())
    assert sparse["tensor_peak_bytes"] < masked["tensor_peak_bytes"], "exact peak bytes: sparse holds fewer"


def test_published_module_masks_gradients_and_matches_the_library():
    sys.path.insert(0, str(BENCH))
    try:
        from published import LoopHetConv, mask_gradients, published_from_masked
    finally:
        sys.path.remove(str(BENCH))
    from sparse_hetconv import MaskedHetConv2d

    torch.manual_seed(0)
    masked = MaskedHetConv2d(8, 8, 4, dtype=torch.float64)
    published, loop = published_from_masked(masked), LoopHetConv(masked).double()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(published(x), masked(x))
    torch.testing.assert_close(loop(x), masked(x))
    published(x).sum().backward()
    mask_gradients(published)
    diagonal = published.pwc.weight.grad.reshape(8, 8)[~masked.pattern.mask_1x1()]
    assert torch.equal(diagonal, torch.zeros_like(diagonal)), "masked gradients must be zero on the diagonal"


def test_interleaved_latency_and_its_argument_checks():
    calls = []
    stats = profiling.interleaved_latency({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                          warmup=1, repeats=3)
    assert set(stats) == {"a", "b"} and calls.count("a") == 4 and calls.count("b") == 4
    assert calls[2:4] == ["a", "b"] and calls[4:6] == ["b", "a"], "rounds must rotate the order"
    assert all(s["min_ms"] <= s["median_ms"] <= s["max_ms"] for s in stats.values())
    with pytest.raises(ValueError, match="repeats >= 1"):
        profiling.interleaved_latency({"a": lambda: None}, repeats=0)


def test_malloc_thresholds_pin_and_verify():
    assert profiling.pin_mmap_threshold() in (True, False)
    if sys.platform == "linux":
        assert profiling.mmap_threshold_pinned() in (True, None)
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
        profiling.peak_training_memory("sparse_hetconv.profiling:does_not_exist")


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
