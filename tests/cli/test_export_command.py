"""``sparse-hetconv export``: ONNX and PT2 files from a checkpoint, and its one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_hetconv.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
from models import small_net, with_statistics  # noqa: E402

pytest.importorskip("onnxscript", reason="onnxscript is in the deploy extra")
pytest.importorskip("onnxruntime", reason="onnxruntime is in the deploy extra")
SIZE = "3,16,16"
FACTORY = ["--model", "models:small_net", "--model-arg", "form=masked", "--input-size", SIZE]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparse-hetconv export: error: "), f"stderr: {err!r}"
    return lines[0]


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    path = tmp_path / "model.pt"
    torch.save(with_statistics(small_net(form="masked")).state_dict(), path)
    return path


def test_onnx_export_of_a_checkpoint(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint), "--out", str(out), *FACTORY]) == 0
    assert "2 HetConv layers" in capsys.readouterr().out
    from sparse_hetconv.deploy import runtimes

    assert runtimes.run(runtimes.load("onnxruntime", out), torch.randn(3, 3, 16, 16)).shape == (3, 10)


def test_pt2_export_loads_back(checkpoint, tmp_path):
    out = tmp_path / "model.pt2"
    assert main(["export", str(checkpoint), "--out", str(out), "--format", "pt2", *FACTORY]) == 0
    program = torch.export.load(str(out))
    assert program.module()(torch.randn(4, 3, 16, 16)).shape == (4, 10)


def test_int8_onnx_with_the_digits(checkpoint, tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "int8.onnx"
    assert main(["export", str(checkpoint), "--out", str(out), "--int8", "--calibration", "digits", *FACTORY]) == 0
    assert "int8 QDQ" in capsys.readouterr().out and out.is_file()


def test_user_mistakes_are_one_line_and_write_nothing(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    cases = [
        (["--out", str(tmp_path)], "is a folder"),
        (["--out", str(tmp_path / "no" / "m.onnx")], "does not exist"),
        (["--out", str(out), "--int8"], "--int8 needs --calibration"),
        (["--out", str(out), "--calibration", "digits"], "--calibration is only read with --int8"),
        (["--out", str(out), "--int8", "--calibration", str(tmp_path / "none")], "no such calibration folder"),
    ]
    for extra, message in cases:
        assert main(["export", str(checkpoint), *extra, *FACTORY]) == 2, extra
        assert message in _one_error_line(capsys.readouterr().err), extra
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    np.save(wrong / "x.npy", np.zeros((2, 3, 8, 8), dtype=np.float32))
    assert main(["export", str(checkpoint), "--out", str(out), "--int8", "--calibration", str(wrong), *FACTORY]) == 2
    assert "calibration images have shape (3, 8, 8)" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()
    assert main(["export", str(tmp_path / "missing.pt"), "--out", str(out), *FACTORY]) == 2
    assert "no such checkpoint file" in _one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "wrong"]


def test_a_checkpoint_that_is_not_a_hetconv_model(tmp_path, capsys):
    path = tmp_path / "plain.pt"
    torch.save(small_net(part=1).state_dict(), path)
    assert main(["export", str(path), "--out", str(tmp_path / "p.onnx"), "--model", "models:small_net",
                 "--model-arg", "part=1", "--input-size", SIZE]) == 2
    assert "not a HetConv model" in _one_error_line(capsys.readouterr().err)


def test_a_runtime_that_is_not_installed(checkpoint, tmp_path, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    out = tmp_path / "ov.onnx"
    assert main(["export", str(checkpoint), "--out", str(out), "--runtime", "openvino", *FACTORY]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "openvino is not installed: pip install 'sparse_hetconv[deploy]'" in line
    assert not out.exists()
