"""The package as users install it: a wheel built from this tree, installed into a fresh virtual
environment, run with no C++ compiler on PATH. With a compiler at build time the wheel carries the
CPU kernels (one abi3 binary, both instruction sets) and they run; without one the wheel is pure
Python and the operator runs its stock formulation. Slow (it compiles the kernels once).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

from sparse_hetconv import ops

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SCRIPT = """
import sys, torch, sparse_hetconv
from sparse_hetconv import SparseHetConv2d, ops
assert not sparse_hetconv.__file__.startswith({root!r}), sparse_hetconv.__file__
print(ops.kernel_info())
torch.manual_seed(0)
layer = SparseHetConv2d(32, 32, 4, bias=True, backend="fused")
x = torch.randn(2, 32, 7, 7, requires_grad=True)
y = layer(x)
y.square().sum().backward()
expected = ops.het_conv2d(x.detach(), layer.weight_kxk.detach(), layer.weight_1x1.detach(), layer.bias.detach(),
                          (1, 1), (1, 1), (1, 1), 4, "stock")
torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
print("kernel", ops.cpu_kernel())
"""


def _wheel(tmp_path: Path, env: dict) -> Path:
    """Build a wheel from a copy of the sources: the checkout's own build/ folder (an editable
    install's objects) and compiled library must not stand in for a compilation."""
    source, out = tmp_path / "source", tmp_path / "dist"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "*.so", "__pycache__", ".hypothesis", ".pytest_cache", "results",
        "notebooks", "docs"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(out),
                           str(source)], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    wheel, = out.glob("sparse_hetconv-*.whl")
    return wheel


def _run_installed(tmp_path: Path, wheel: Path) -> subprocess.CompletedProcess:
    """Install ``wheel`` into a fresh environment that sees this interpreter's torch (and the other
    dependencies) but not this tree, then run SCRIPT there with nothing but the environment on PATH."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, timeout=300)
    env = {"PATH": str(venv / "bin"), "HOME": str(tmp_path), "CXX": "", "CC": ""}
    return subprocess.run([str(python), "-c", SCRIPT.format(root=str(ROOT))], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)


@pytest.mark.skipif(ops.cpu_kernel() is None, reason=ops.kernel_info())
def test_the_wheel_ships_the_cpu_kernels_and_runs_them_without_a_compiler(tmp_path):
    wheel = _wheel(tmp_path, dict(os.environ))
    assert "abi3" in wheel.name, f"the kernels use no Python API: one wheel per platform, got {wheel.name}"
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("sparse_hetconv/_C") and n.endswith(".so") for n in names), names
    done = _run_installed(tmp_path, wheel)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"kernel {ops.cpu_kernel()}" in done.stdout and f"CPU: {ops.cpu_kernel()} kernels" in done.stdout, done.stdout


def test_a_wheel_built_without_a_compiler_installs_and_runs_the_stock_formulation(tmp_path):
    broken = tmp_path / "no-compiler"
    broken.write_text("#!/bin/sh\necho 'no compiler here' >&2\nexit 1\n")
    broken.chmod(0o755)
    wheel = _wheel(tmp_path, dict(os.environ, CC=str(broken), CXX=str(broken), LDSHARED=f"{broken} -shared"))
    assert not any("_C" in n for n in zipfile.ZipFile(wheel).namelist()), "no kernels were built, none shipped"
    done = _run_installed(tmp_path, wheel)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernel None" in done.stdout and "CPU: none (this install has no compiled CPU kernels" in done.stdout, \
        done.stdout
    assert torch.__version__  # (the fresh environment used this interpreter's torch)
