"""``sparse-hetconv export``: ONNX and PT2 files from a checkpoint, and its one-line errors."""

from __future__ import annotations

import re
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


def test_int8_pt2_is_compared_with_the_float_model(checkpoint, tmp_path, capsys):
    """The figure is the int8 program against the float32 model (it compared the quantized
    program with itself and always said 0.0e+00), and the output line says so."""
    pytest.importorskip("torchao")
    pytest.importorskip("sklearn")
    out = tmp_path / "int8.pt2"
    assert main(["export", str(checkpoint), "--out", str(out), "--int8", "--calibration", "digits", *FACTORY]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    found = re.search(r"int8 .*largest difference to the float32 model ([0-9.e+-]+) of the output's magnitude "
                      r"\(int8 rounding\), top-1 agreement with it on the calibration data ([0-9.]+)%", line)
    assert found, line
    from sparse_hetconv.checkpoint import load_model
    from sparse_hetconv.deploy import digits

    net, _ = load_model(checkpoint, "models:small_net", model_kwargs={"form": "masked"})
    x = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(0))  # the command's probe
    with torch.no_grad():
        expected, got = net(x), torch.export.load(str(out)).module()(x)
    difference = float((got - expected).abs().max() / expected.abs().max())
    assert 0 < difference < 0.2 and float(found[1]) == pytest.approx(difference, rel=0.05, abs=1e-4), (line, difference)
    assert 50 <= float(found[2]) <= 100, line


@pytest.mark.parametrize("extra, message", [
    (["--out", "m.onnx", "--format", "pt2"], r"--out \(.*m.onnx\) ends in '.onnx' but --format is pt2: name the file "
                                             r"m.pt2 or pass --format onnx"),
    (["--out", "m.pt2", "--format", "onnx"], r"--out \(.*m.pt2\) ends in '.pt2' but --format is onnx"),
    (["--out", "m.bin"], r"--out \(.*m.bin\) must end in .onnx or .pt2"),
    (["--out", "m.pt2", "--runtime", "openvino"], r"--runtime is only read with --format onnx \(the format here is "
                                                  r"pt2\)"),
    (["--out", "m.onnx", "--input-size", "1,16,16"], r"model models:small_net failed on a random input of shape "
                                                     r"\(2, 1, 16, 16\) \(RuntimeError: .*\); pass input_size "
                                                     r"\(--input-size C,H,W\) that it takes"),  # was a traceback
    (["--out", "m.onnx", "--input-size", "3,0,16"], r"--input-size \(3,0,16\) must be C,H,W \(or C,D,H,W\): "
                                                    r"comma-separated ints >= 1"),
    (["--out", "m.onnx", "--input-size", "3,16,16,16"], r"--input-size \(3,16,16,16\) must be C,H,W \(export "
                                                        r"supports 2-D models\)"),
])
def test_option_mistakes_are_one_line_and_write_nothing(checkpoint, tmp_path, capsys, extra, message):
    extra = [str(tmp_path / v) if v.startswith("m.") else v for v in extra]
    factory = FACTORY if "--input-size" not in extra else FACTORY[:-2]
    assert main(["export", str(checkpoint), *extra, *factory]) == 2
    assert re.search(message, _one_error_line(capsys.readouterr().err))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"], "something was written"


def test_damaged_calibration_files_are_named(checkpoint, tmp_path, capsys):
    """Each damaged or foreign calibration file: one line naming it (a cut .pt file was a
    RuntimeError traceback, a .npy of pickled objects numpy's advice to load it unsafely)."""
    pytest.importorskip("PIL")
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((2, 3, 16, 16), dtype=np.float32))
    torch.save(torch.zeros(2, 3, 16, 16), tmp_path / "good.pt")
    cases = {
        "cut.pt": ((tmp_path / "good.pt").read_bytes()[:100], r"cut.pt is not a readable PyTorch checkpoint "
                                                               r"\(truncated or damaged"),
        "cut.npy": (good.read_bytes()[:100], r"calibration file .*cut.npy cannot be read: EOF"),
        "objects.npy": (None, r"calibration file .*objects.npy cannot be read: it holds pickled Python objects, which "
                              r"are never loaded"),
        "text.png": (b"not an image", r"cannot identify image file .*text.png"),
    }
    for name, (content, message) in cases.items():
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        if content is None:
            np.save(folder / name, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        else:
            (folder / name).write_bytes(content)
        out = tmp_path / "int8.onnx"
        assert main(["export", str(checkpoint), "--out", str(out), "--int8", "--calibration", str(folder),
                     *FACTORY]) == 2, name
        assert re.search(message, _one_error_line(capsys.readouterr().err)), name
        assert not out.exists(), name


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
    assert _one_error_line(capsys.readouterr().err).endswith(f"{tmp_path / 'missing.pt'}: checkpoint does not exist")
    assert main(["export", str(tmp_path / "wrong"), "--out", str(out), *FACTORY]) == 2
    assert _one_error_line(capsys.readouterr().err).endswith(f"{tmp_path / 'wrong'}: is a folder, expected a checkpoint "
                                                             "file")
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
