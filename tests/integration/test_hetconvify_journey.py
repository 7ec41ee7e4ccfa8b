"""The newcomer's journey: a standard CNN of one's own, ``hetconvify``, train, save, and in a new
process load it with the *original* factory (``load_model``, ``sparse-hetconv export``,
``sparse-hetconv convert``), export to ONNX, and get the trained model's outputs back.

The factory is written by the test into its own folder (``mynet.py``), as a user's project would
hold it; it never calls hetconvify. The checkpoint is a plain ``torch.save(model.state_dict())``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sparse_hetconv as shc

REPO = Path(__file__).resolve().parents[2]
FACTORY = textwrap.dedent('''
    from torch import nn


    def build(width=16, num_classes=10):
        """A plain CNN: a stem, two 3x3 convolutions with BatchNorm (one strided, one with bias), a head."""
        return nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))
''')


def _project(tmp_path: Path) -> Path:
    (tmp_path / "mynet.py").write_text(FACTORY)
    return tmp_path


def _new_process(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """``python ARGS`` in a new interpreter, in the user's project folder, importing this worktree."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(folder)])}
    done = subprocess.run([sys.executable, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args[:3]} failed ({done.returncode}): {done.stderr[-3000:]}"
    return done


def _trained(folder: Path, form: str):
    """hetconvify(build(), part=4) trained 3 SGD steps (BatchNorm statistics move too), saved
    with a plain torch.save of its state_dict; the model in eval mode and the checkpoint."""
    sys.path.insert(0, str(folder))
    try:
        import mynet
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("mynet", None)
    torch.manual_seed(0)
    model = shc.hetconvify(mynet.build(), part=4, form=form, return_report=False)
    assert sum(isinstance(m, (shc.SparseHetConv2d, shc.MaskedHetConv2d)) for m in model.modules()) == 2
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    path = folder / f"trained_{form}.pt"
    torch.save(model.state_dict(), path)
    return model.eval(), path


@pytest.mark.parametrize("form", ["sparse", "masked"])
def test_hetconvify_train_save_reload_export(form, tmp_path):
    pytest.importorskip("onnxscript", reason="onnxscript is in the deploy extra")
    pytest.importorskip("onnxruntime", reason="onnxruntime is in the deploy extra")
    folder = _project(tmp_path)
    model, checkpoint = _trained(folder, form)
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.save(x, folder / "x.pt")
    with torch.no_grad():
        expected = model(x)
    # A new process: the user's original factory, no hetconvify anywhere in it.
    load = ("import torch; from sparse_hetconv.checkpoint import load_model; "
            f"model, info = load_model({checkpoint.name!r}, 'mynet:build'); assert info['form'] == 'hetconvify', info; "
            "assert info['part'] == 4, info; torch.save(model(torch.load('x.pt')).detach(), 'y.pt')")
    _new_process(folder, "-c", load)
    loaded = torch.load(folder / "y.pt", weights_only=True)
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-6, msg="load_model in a new process differs")
    done = _new_process(folder, "-m", "sparse_hetconv", "export", checkpoint.name, "--model", "mynet:build",
                        "--input-size", "3,16,16", "--out", "mynet.onnx")
    assert "2 HetConv layers" in done.stdout, done.stdout
    from sparse_hetconv.deploy import runtimes

    got = torch.as_tensor(runtimes.run(runtimes.load("onnxruntime", folder / "mynet.onnx"), x))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg="the ONNX file differs from the trained model")


def test_convert_with_the_original_factory(tmp_path):
    """A masked-form hetconvify checkpoint converts with the original factory and loads back;
    a sparse-form one is already converted, and the command says so."""
    folder = _project(tmp_path)
    model, checkpoint = _trained(folder, "masked")
    done = _new_process(folder, "-m", "sparse_hetconv", "convert", checkpoint.name, "sparse.pt", "--model",
                        "mynet:build", "--input-size", "3,16,16")
    assert "converted 2 layers" in done.stdout, done.stdout
    from sparse_hetconv.checkpoint import load_model

    sys.path.insert(0, str(folder))
    try:
        converted, info = load_model(folder / "sparse.pt", "mynet:build")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("mynet", None)
    assert info["form"] == "hetconvify" and info["part"] == 4, info
    assert any(isinstance(m, shc.SparseHetConv2d) for m in converted.modules()), "not the sparse form"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-6)
    _, sparse_checkpoint = _trained(folder, "sparse")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(folder)])}
    refused = subprocess.run([sys.executable, "-m", "sparse_hetconv", "convert", sparse_checkpoint.name, "again.pt",
                              "--model", "mynet:build"], cwd=folder, env=env, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "already holds the sparse form of model mynet:build: nothing to convert" \
        in refused.stderr, refused.stderr
    assert not (folder / "again.pt").exists()
