"""The GPU readiness script's dry run (``python -m benchmarks.gpu_check --dry-run``) on this machine.

The dry run builds every VGG-16 variant and the layer list on the CPU and writes the report with
"not run" entries; the GPU itself is exercised only on a GPU machine (``make gpu-check``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_writes_the_report(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path), "--dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"dry run exited {done.returncode}: {done.stderr[-2000:]}"
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    text = (tmp_path / "gpu_check.md").read_text()
    variants = report["variants"]
    assert set(variants) == {"published", "masked", "sparse_auto", "sparse_triton"}, f"variants {sorted(variants)}"
    layers = {name: v["hetconv_layers"] for name, v in variants.items()}
    assert len(set(layers.values())) == 1 and layers["masked"] > 0, f"HetConv layers per variant differ: {layers}"
    assert variants["sparse_triton"]["triton_layers"] == layers["masked"], \
        f"{variants['sparse_triton']['triton_layers']} of {layers['masked']} layers are on triton"
    assert variants["published"]["gradient_masking"] and not variants["published"]["channels_last"], \
        f"the published variant should be NCHW with gradient masking: {variants['published']}"
    shapes = report["layers"]["float32"]
    assert shapes and all(0 < s["useful_over_standard"] < 1 for s in shapes), f"layer shapes: {shapes}"
    for section in ("tests", "network"):
        for name, entry in report[section].items():
            assert isinstance(entry, str) and entry.startswith("not run: "), f"{section}/{name} is {entry!r}"
    assert "placeholder" not in text.lower() and "TODO" not in text, "the markdown report has placeholders"
    assert report["environment"]["device"] in text and "benchmarks.gpu_check" in text, \
        "the markdown report does not name the card and the command"


def test_cuda_test_files_collect_on_a_bare_gpu_machine():
    """The GPU machine has torch, triton, pytest and hypothesis only: the files gpu_check runs must
    collect there (a collection error would stop the whole run and waste the GPU session)."""
    from benchmarks.gpu_check import BARE_MACHINE_MISSING, cuda_test_files

    files = cuda_test_files() + ["tests/backends/test_triton.py"]
    code = ("import sys\n"
            f"for name in {BARE_MACHINE_MISSING!r}:\n    sys.modules[name] = None  # import fails\n"
            "import pytest\n"
            f"sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', *{files!r}]))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"collection failed without the optional packages:\n{done.stdout[-3000:]}"


def test_backward_choices_time_every_pair():
    """Step 4 (the backward's choice) runs end to end on one tiny layer under Triton's interpreter:
    the operator with impl "triton" is checked against impl "stock" and both are timed."""
    import pytest

    from sparse_hetconv.backends import available

    if not available("triton", "cpu"):
        pytest.skip("triton is not installed (or its interpreter is off)")
    from benchmarks.gpu_check import BACKWARD_PAIRS, backward_choices, markdown

    shape = {"in_channels": 8, "out_channels": 8, "part": 4, "size": 4, "stride": 1, "useful_over_standard": 0.5}
    rows = backward_choices([shape], batch=1, mode="float32", warmup=0, repeats=1, device="cpu")
    (row,) = rows
    assert "error" not in row, row.get("error")
    pairs = set(BACKWARD_PAIRS)
    assert set(row["ms"]) == pairs and row["fastest"] in pairs, row
    assert all(e < 1e-5 for e in row["rel_error"].values()), row["rel_error"]
    report = {"environment": {"device": "cpu", "torch": "", "triton": "", "cuda": "", "cudnn": "", "python": "",
                              "command": "x"},
              "triton_wiring": "", "variants": {}, "tests": {}, "network": {}, "part": 4, "batch": 1, "layers": {},
              "backward": {"float32": rows}}
    assert "| 8 | 8 | 4 | 1 |" in markdown(report)


def test_a_failed_step_is_reported_not_fatal():
    """On the GPU each step is saved as it ends and a failing one is recorded as text: the report
    must render such a partial run (the one-shot GPU session must not lose what it measured)."""
    from benchmarks.gpu_check import markdown

    report = {"environment": {"device": "NVIDIA X", "torch": "", "triton": "", "cuda": "", "cudnn": "", "python": "",
                              "command": "python -m benchmarks.gpu_check"},
              "triton_wiring": "", "variants": {}, "tests": {"suite": "not run: --skip-tests"}, "part": 4, "batch": 1,
              "network": {"float32": "failed: RuntimeError: CUDA error"},
              "layers": {"float32": "failed: RuntimeError: CUDA error"}}
    text = markdown(report)
    assert text.count("failed: RuntimeError: CUDA error") == 2 and "NVIDIA X" in text
