"""The deployment benchmark (``make bench``'s second half): a tiny run, its report and docs section.

No timing is asserted: only that every variant was timed and checked, that ONNX Runtime's profile
holds every model's operators, and that each missed target is explained.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a benchmark run, however small
pytest.importorskip("onnxruntime", reason="the deploy extra is not installed")
pytest.importorskip("openvino", reason="the deploy extra is not installed")
pytest.importorskip("torchao", reason="the deploy extra is not installed")

from benchmarks.harness import deploy_report as D  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("eager", "compiled", "ort_published", "ort", "openvino", "int8_pt2e", "int8_ort")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy")
    argv = ["--models", "vgg16_cifar", "--parts", "1", "4", "--batch", "2", "--repeats", "1",
            "--warmup", "1", "--no-forms", "--no-accuracy", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.deploy", *argv], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "deploy.json").read_text())


def test_every_variant_is_timed_and_checked(tiny_run):
    out, result = tiny_run
    for name in ("deploy.md", "deploy.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, f"{name} was not written"
    timed = {(r["part"], r["batch"], r["variant"]) for r in result["rows"]}
    assert timed == {(p, b, v) for p in (1, 4) for b in (1, 2) for v in VARIANTS}, timed
    for row in result["rows"]:
        assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0
    ideal = [r for r in result["rows"] if r["part"] == 4 and r["variant"] in ("ort", "openvino")]
    assert all(r["ideal_ms"] > 0 for r in ideal), "each runtime's FLOP-ideal is reported beside it"
    for check in result["checks"]:
        for variant in ("compiled", "ort_published", "ort", "openvino"):
            assert check[variant]["max_rel_diff"] <= 1e-3, (check["part"], variant, check[variant])


def test_onnx_runtime_profile_holds_every_model(tiny_run):
    _, result = tiny_run
    profile = result["ort_profile"]
    assert set(profile["ms"]) == {"published", "float32", "int8"}
    for name, ops in profile["ms"].items():
        assert ops and all(ms >= 0 for ms in ops.values()) and sum(ops.values()) > 0, name
    assert any(op.endswith("(grouped)") for op in profile["ms"]["float32"]), "grouped convolutions are told apart"
    assert any("QLinearConv" in op for op in profile["ms"]["int8"]), "the int8 model runs int8 convolutions"
    assert all(profile["run_ms"][name] >= 0.5 * sum(profile["ms"][name].values()) for name in profile["ms"]), \
        "a whole run holds its operators' kernels"
    table = D.ort_profile_table(result)
    assert "published export" in table and "shipped export, int8" in table


def test_each_missed_target_is_explained(tiny_run):
    out, result = tiny_run
    missed = [t for t in D.targets(result) if t["met"] is False]
    explained = D.misses(result)
    assert len(explained) == len(missed), (missed, explained)
    text = (out / "deploy.md").read_text()
    assert "## Misses" in text and "## ONNX Runtime's profile" in text


def test_docs_section_shows_a_capped_run(tiny_run):
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import docs_page
    finally:
        sys.path.remove(str(ROOT))
    _, result = tiny_run
    capped = json.loads(json.dumps(result))
    capped["machine"]["isa_cap"] = "AVX2"
    text = "\n".join(docs_page.deploy_section(result, None, capped))
    assert "### PyTorch's oneDNN / MKL capped to AVX2" in text and ">= 1.5x (AVX2)" in text, \
        "the capped run is judged by the AVX2 int8 target"
    assert "### Misses explained" in text
