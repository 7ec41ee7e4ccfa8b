"""The benchmark: a tiny run of ``python -m benchmarks.bench``, the docs page made from it, its references.

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

pytestmark = pytest.mark.slow  # a benchmark run, however small

from sparse_hetconv import count_params
from sparse_hetconv.models import vgg16_cifar

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--parts", "2", "--batch", "2", "--repeats", "1", "--warmup", "1", "--levels", "layer",
            "--shapes", "1", "--no-profile", "--variants", "standard_cl", "published", "masked_cl",
            "sparse_grouped_cl", "sparse_auto_cl", "--out", str(out)]
    # A separate process: the benchmark sets process-wide state (threads, malloc, denormals).
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", *argv], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "bench.json").read_text())


def test_bench_writes_json_tables_and_plot(tiny_run):
    out, result = tiny_run
    for name in ("bench.md", "layers.md", "profiles.md", "latency_vs_p.png", "layers.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, f"{name} was not written"
    assert result["machine"]["threads"] == torch.get_num_threads()
    assert result["machine"]["cpu"], "the machine must be named in the output"
    text = (out / "bench.md").read_text()
    assert "## Targets" in text and "threads" in text and "python -m benchmarks.bench" in text
    assert result["finished"] is True


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
    assert all(r["backend"] in ("dense", "grouped", "fused") for r in auto), "auto's resolved backend must be recorded"
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




def test_repository_docs_page_renders_from_a_run(tiny_run, tmp_path):
    out, _ = tiny_run
    docs = tmp_path / "performance.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.docs_page", str(out / "bench.json"), "--docs", str(docs)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = docs.read_text()
    assert "## Targets" in text and (tmp_path / "performance_latency_vs_p.png").is_file(), "docs page incomplete"
    assert (tmp_path / "performance_layers.png").is_file() and "performance_layers.png" in text, "no per-layer plot"


def test_published_module_masks_gradients_and_matches_the_library():
    from sparse_hetconv import MaskedHetConv2d
    from benchmarks.harness.published import LoopHetConv, mask_gradients, published_from_masked

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


@pytest.mark.parametrize("argv,message", [
    (["--threads", "-1"], "--threads: must be an integer >= 1, got -1"),
    (["--batch", "0"], "--batch: must be an integer >= 1, got 0"),
    (["--repeats", "0"], "--repeats: must be an integer >= 1, got 0"),
    (["--parts", "2", "3"], "parts holds 3, expected divisors of VGG-16's 64 channels"),
])
def test_bad_options_are_refused_before_any_work(argv, message, tmp_path, capsys):
    from benchmarks.bench import main

    with pytest.raises(SystemExit) as status:
        main([*argv, "--out", str(tmp_path / "out")])
    assert status.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists(), "nothing may be written"


def test_an_output_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    from benchmarks.bench import main

    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as status:
        main(["--parts", "2", "--out", str(tmp_path / "afile")])
    assert status.value.code == 2
    assert "is a file, expected a folder" in capsys.readouterr().err
