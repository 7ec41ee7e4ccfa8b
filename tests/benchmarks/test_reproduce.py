"""``make reproduce``'s quick mode end to end (``python -m benchmarks.reproduce --quick``) on real
Fashion-MNIST, resumption, the recipe guard and the page made from the JSON.

No timing or accuracy is asserted (a quick run trains one epoch on a few hundred images): only that
every record is complete, and that what must be exact is (the plan, MACs and parameters, the
chain's verdict against its rows, records kept across a resumed run).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a benchmark run, however small

from sparse_hetconv import count_macs, count_params  # noqa: E402
from sparse_hetconv.models import vgg16_cifar  # noqa: E402
from sparse_hetconv.training import FASHION_MNIST_DEFAULT, find_fashion_mnist  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="33554432", MALLOC_TRIM_THRESHOLD_="1073741824")


def reproduce(*argv: str, timeout: int = 900) -> subprocess.CompletedProcess:
    # A separate process, as make runs it: the benchmark pins malloc and sets the autotuner's state.
    return subprocess.run([sys.executable, "-m", "benchmarks.reproduce", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=ENV)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    try:
        find_fashion_mnist()
    except FileNotFoundError:
        pytest.skip(f"Fashion-MNIST is not installed in {FASHION_MNIST_DEFAULT} (apt-get install "
                    "dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("reproduce")
    argv = ("--quick", "--json", str(out / "r.json"), "--docs", str(out / "r.md"), "--work", str(out / "work"))
    proc = reproduce(*argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, argv, json.loads((out / "r.json").read_text())


def test_every_run_of_the_plan_is_recorded(quick):
    from benchmarks.reproduce import RECIPES, plan

    _, _, results = quick
    runs = results["runs"]
    assert results["recipe"] == RECIPES["quick"] and results["recipe_name"] == "quick"
    assert [(r["part"], r["form"], r["seed"]) for r in runs] == plan(RECIPES["quick"])
    assert {r["part"] for r in runs} == {1, 2, 4, 8, 16, 32, 64}
    assert sorted(r["seed"] for r in runs if (r["part"], r["form"]) == (4, "sparse")) == [0, 1]
    for r in runs:
        assert 0 <= r["test_acc"] <= 1 and r["test_images"] == 500 and r["train_images"] == 256, r
        assert r["seconds_per_epoch"] > 0 and math.isfinite(r["images_per_s"]) and len(r["history"]) == r["epochs"]
        assert r["machine"]["cpu"] and r["machine"]["isa"] and r["dataset"] == "fashion_mnist"
        model = vgg16_cifar(part=r["part"])
        assert (r["macs"], r["params"]) == (count_macs(model, (1, 3, 32, 32)), count_params(model)), \
            f"P = {r['part']} {r['form']}: MACs and parameters must be the paper's convention's"
    stored = {r["form"]: r["params_stored"] for r in runs if r["part"] == 4 and r["seed"] == 0}
    assert stored["sparse"] < stored["masked"] == stored["published"], stored


def test_the_chain_is_checked_against_its_rows(quick):
    chain = quick[2]["chain"]
    names = [r["name"] for r in chain["rows"]]
    assert names[0] == "sparse, as trained (PyTorch)"
    assert {"to_masked (PyTorch)", "ONNX Runtime, float32", "int8 PT2E + Inductor", "int8 ONNX Runtime (QDQ)"} <= \
        set(names), names
    checked = [r for r in chain["rows"] if "test_acc" in r]
    assert chain["ok"] == all(abs(r["delta_points"]) <= 0.5 for r in checked)
    exact = [r for r in checked if r["name"].endswith("(PyTorch)") or r["name"].startswith("checkpoint")]
    assert all(r["agreement"] >= 0.99 for r in exact), [(r["name"], r["agreement"]) for r in exact]


def test_the_page_and_figure_are_written(quick):
    out, _, _ = quick
    text = (out / "r.md").read_text()
    for heading in ("## Accuracy, MACs and time vs P", "## The three forms at P = 4", "## What the numbers say",
                    "## The trained P = 4 model through conversion and deployment", "## Every run"):
        assert heading in text, f"the page lacks {heading}"
    assert "**Quick run**" in text and quick[2]["runs"][0]["machine"]["cpu"] in text, "the page names the CPU"
    assert (out / "r.png").is_file() and (out / "r.png").stat().st_size > 10_000
    again = reproduce("--quick", "--report-only", "--json", str(out / "r.json"), "--docs", str(out / "again.md"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "again.md").read_text() == text.replace("r.png", "again.png"), "the page depends on the JSON only"


def test_a_recorded_run_is_skipped_and_a_missing_one_trained(quick):
    out, argv, results = quick
    kept = [r for r in results["runs"] if r["part"] != 64]
    (out / "r.json").write_text(json.dumps(dict(results, runs=kept)))
    proc = reproduce(*argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(kept)} runs recorded in {out / 'r.json'}, 1 to go" in proc.stderr
    after = json.loads((out / "r.json").read_text())
    assert after["runs"][:-1] == kept and after["runs"][-1]["part"] == 64, "only the missing run was trained"
    assert after["chain"] == results["chain"], "the chain check is kept with its run"


def test_a_json_of_another_recipe_is_refused(quick, tmp_path):
    out, _, results = quick
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(results, recipe=dict(results["recipe"], epochs=99))))
    proc = reproduce("--quick", "--json", str(other), "--docs", str(tmp_path / "o.md"))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "holds runs of another recipe" in proc.stderr and not (tmp_path / "o.md").exists()


def test_missing_data_set_is_one_line(tmp_path):
    proc = reproduce("--quick", "--data", str(tmp_path / "none"), "--json", str(tmp_path / "r.json"), "--docs",
                     str(tmp_path / "r.md"), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and "Fashion-MNIST not found" in proc.stderr, proc.stderr
    assert "apt-get install dataset-fashion-mnist" in proc.stderr and not (tmp_path / "r.json").exists()
