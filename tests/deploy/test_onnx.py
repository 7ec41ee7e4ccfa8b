"""export_onnx: ONNX files that ONNX Runtime and OpenVINO run, checked before they are written."""

from __future__ import annotations

import os

import pytest
import torch

from models import small_net, with_statistics
from sparse_hetconv import to_masked
from sparse_hetconv.deploy import FORMS, TOLERANCE, export_onnx, runtimes

pytest.importorskip("onnxscript", reason="onnxscript is in the deploy extra")
ORT = pytest.mark.skipif(not runtimes.available("onnxruntime"), reason="onnxruntime is in the deploy extra")
OPENVINO = pytest.mark.skipif(not runtimes.available("openvino"), reason="openvino is in the deploy extra")
SIZE = (3, 16, 16)


def model():
    return with_statistics(small_net())


def outputs(runtime, path, x):
    return runtimes.run(runtimes.load(runtime, path), x)


@ORT
@pytest.mark.parametrize("runtime", [pytest.param("onnxruntime"), pytest.param("openvino", marks=OPENVINO)])
def test_the_file_runs_in_the_runtime_with_a_dynamic_batch(runtime, tmp_path):
    net = model()
    result = export_onnx(net, tmp_path / "net.onnx", SIZE, runtime=runtime)
    assert result.path.is_file() and result.layers == 2 and result.bytes == result.path.stat().st_size
    assert all(d <= TOLERANCE for d in result.differences.values()), result.differences
    assert runtime in result.differences, "the target runtime is always checked"
    for batch in (1, 5):
        x = torch.randn((batch,) + SIZE)
        with torch.no_grad():
            expected = net(x)
        got = outputs(runtime, result.path, x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


@ORT
@pytest.mark.parametrize("form", FORMS)
def test_every_form_exports_exactly(form, tmp_path):
    result = export_onnx(model(), tmp_path / f"{form}.onnx", SIZE, form=form, dynamic_batch=False)
    assert result.form == form and all(d <= TOLERANCE for d in result.differences.values()), result.differences


@ORT
def test_a_masked_model_exports_too(tmp_path):
    net = to_masked(model(), memory_format=None).eval()
    result = export_onnx(net, tmp_path / "masked.onnx", SIZE)
    assert result.layers == 2


@ORT
def test_a_runtime_that_computes_otherwise_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    target = tmp_path / "net.onnx"
    target.write_bytes(b"previous")
    run = runtimes.run
    monkeypatch.setattr(runtimes, "run", lambda session, x: run(session, x) * 1.01)
    with pytest.raises(ValueError, match=r"computes the exported model differently: largest difference"):
        export_onnx(model(), target, SIZE, check=("onnxruntime",))
    assert target.read_bytes() == b"previous", "the existing file must be untouched"
    assert [p.name for p in tmp_path.iterdir()] == ["net.onnx"], "no temporary file may be left"


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    net = model()
    with pytest.raises(ValueError, match=r"input_size \(\(3, 16\)\) must be three ints"):
        export_onnx(net, tmp_path / "a.onnx", (3, 16))
    with pytest.raises(ValueError, match=r"runtime \('tensorrt'\) must be one of"):
        export_onnx(net, tmp_path / "a.onnx", SIZE, runtime="tensorrt")
    with pytest.raises(IsADirectoryError):
        export_onnx(net, tmp_path, SIZE)
    with pytest.raises(FileNotFoundError):
        export_onnx(net, tmp_path / "missing" / "a.onnx", SIZE)
    (tmp_path / "b.onnx").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        export_onnx(net, tmp_path / "b.onnx", SIZE, force=False)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        export_onnx("model", tmp_path / "a.onnx", SIZE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.onnx"]


def test_a_runtime_that_is_not_installed_names_the_extra(monkeypatch):
    import builtins

    from sparse_hetconv._checks import MissingExtraError

    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    assert not runtimes.available("openvino")
    with pytest.raises(MissingExtraError, match=r"openvino is not installed: pip install 'sparse_hetconv\[deploy\]'"):
        runtimes.load("openvino", b"")
    assert os.environ.get("PYTEST_CURRENT_TEST")
