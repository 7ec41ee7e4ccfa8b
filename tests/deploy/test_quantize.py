"""int8: PT2E with the X86 Inductor quantizer and ONNX Runtime's QDQ, on real data (digits)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from models import small_net, with_statistics
from sparse_hetconv.deploy import calibration_batches, compile_int8, digits, export_onnx, quantize, quantize_onnx, runtimes

SIZE = (3, 16, 16)
torchao = pytest.importorskip("torchao", reason="torchao is in the deploy extra")
pytest.importorskip("sklearn", reason="scikit-learn is in the deploy extra (the digits data set)")


def test_digits_are_real_images_resized_and_split():
    x, y = digits(SIZE)
    assert x.shape == (1797,) + SIZE and set(y.tolist()) == set(range(10))
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    train, test = digits(SIZE, "train")[0], digits(SIZE, "test")[0]
    assert len(train) == 1437 and len(test) == 360
    together = torch.cat([train, test]).sum((1, 2, 3)).sort().values
    torch.testing.assert_close(together, x.sum((1, 2, 3)).sort().values, msg="the splits must partition the set")


def test_pt2e_int8_runs_close_to_float32_and_compiles():
    net = with_statistics(small_net(), SIZE)
    calibration = calibration_batches("digits", SIZE, batch=16, count=64)
    quantized = quantize(net, calibration, input_size=SIZE)
    names = {str(n.target) for n in quantized.graph.nodes if n.op == "call_function"}
    assert any("quantize_per_tensor" in n for n in names), f"no quantize ops in {sorted(names)[:8]}"
    x = calibration[0]
    with torch.no_grad():
        expected, reference = net(x), quantized(x)
    error = float((reference - expected).norm() / expected.norm())
    assert error < 0.1, f"int8 (reference arithmetic) is {error:.3f} away from float32"
    import torch._inductor.config as inductor_config

    compiled = compile_int8(quantized, x[:1])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference, rtol=0.05, atol=0.05 * float(reference.abs().max()))
    # Freezing is this model's: a later torch.compile in the process must not freeze its weights.
    assert inductor_config.freezing is False, "compile_int8 left Inductor's freezing on for the process"


def test_onnx_int8_runs(tmp_path):
    if not runtimes.available("onnxruntime"):
        pytest.skip("onnxruntime is in the deploy extra")
    net = with_statistics(small_net(), SIZE)
    float_file, int8_file = tmp_path / "f.onnx", tmp_path / "q.onnx"
    export_onnx(net, float_file, SIZE, check=("onnxruntime",))
    quantize_onnx(float_file, int8_file, "digits", SIZE, batches=2)
    import onnx

    ops = {node.op_type for node in onnx.load(str(int8_file)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops, ops
    x = calibration_batches("digits", SIZE, count=16)[0]
    got = runtimes.run(runtimes.load("onnxruntime", int8_file), x)
    with torch.no_grad():
        expected = net(x)
    assert float((got - expected).norm() / expected.norm()) < 0.1


def test_bad_calibration_and_models_are_clear_errors(tmp_path):
    net = with_statistics(small_net(), SIZE)
    with pytest.raises(ValueError, match="calibration data is empty"):
        quantize(net, torch.empty(0, *SIZE))
    with pytest.raises(ValueError, match=r"calibration images have shape \(3, 8, 8\), expected the model's input size "
                                         r"\(3, 16, 16\)"):
        quantize(net, torch.randn(4, 3, 8, 8), input_size=SIZE)
    with pytest.raises(FileNotFoundError, match="no such calibration folder"):
        quantize(net, str(tmp_path / "missing"), input_size=SIZE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .npy"):
        quantize(net, tmp_path / "empty", input_size=SIZE)
    with pytest.raises(ValueError, match=r"backend \('arm'\) must be 'x86'"):
        quantize(net, "digits", backend="arm", input_size=SIZE)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        quantize(None, "digits", input_size=SIZE)

    class Branchy(nn.Module):  # data-dependent control flow: torch.export cannot capture it
        def forward(self, x):
            return x if x.sum() > 0 else -x

    model = nn.Sequential(small_net(), )
    model.add_module("odd", Branchy())
    with pytest.raises(ValueError, match=r"cannot quantize: torch.export fails in module 'odd' \(Branchy"):
        quantize(with_statistics(model, SIZE), torch.randn(4, *SIZE), input_size=SIZE)


def test_a_calibration_folder_of_arrays_and_images(tmp_path):
    import numpy as np
    from PIL import Image

    np.save(tmp_path / "a.npy", np.random.rand(3, *SIZE).astype(np.float32))
    Image.fromarray((np.random.rand(20, 24, 3) * 255).astype(np.uint8)).save(tmp_path / "b.png")
    batches = calibration_batches(tmp_path, SIZE, batch=2)
    assert sum(len(b) for b in batches) == 4 and all(tuple(b.shape[1:]) == SIZE for b in batches)


@pytest.mark.slow
def _int8_isa() -> str:
    """The int8 kernels' instruction set, as the assertions below state it."""
    from sparse_hetconv.deploy.quantize import reduced_range, vnni

    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    return (f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, AVX-512 VNNI "
            f"{'used' if vnni() else 'not used'}{f' (ONEDNN_MAX_CPU_ISA={cap})' if cap else ''}, "
            f"reduced range {reduced_range()}")


@pytest.mark.parametrize("cap", [None, "AVX2"])
def test_int8_accuracy_on_the_digits_test_split(cap, monkeypatch):
    """A HetConv model (P = 4) trained on the digits train split: int8 (both routes) within 1
    point of float32 on the test split (360 images), and at least 99 % top-1 agreement with it, on this CPU
    and with oneDNN capped to AVX2 (no VNNI: the int8 products saturate at 16 bits unless the
    range is reduced; 97.5 % agreement on an AVX2 EPYC before it was). The cap is set in a
    subprocess, since oneDNN reads it once per process."""
    if cap is not None and os.environ.get("ONEDNN_MAX_CPU_ISA") != cap:
        env = dict(os.environ, ONEDNN_MAX_CPU_ISA=cap)
        test = f"{__file__}::test_int8_accuracy_on_the_digits_test_split[None]"
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"with ONEDNN_MAX_CPU_ISA={cap}:\n{result.stdout[-3000:]}"
        return
    _int8_accuracy_on_the_digits_test_split()


def _int8_accuracy_on_the_digits_test_split():
    from benchmarks.harness.deploy import predictions, train_on_digits

    size = (3, 16, 16)
    torch.manual_seed(0)
    model = train_on_digits(small_net(part=4), size, epochs=8)
    test, labels = digits(size, "test")
    reference = predictions(model, test)
    accuracy = float((reference == labels).float().mean())
    assert accuracy > 0.9, f"the float32 model learned too little to judge int8 ({accuracy:.3f})"
    calibration = list(digits(size, "train")[0][:256].split(32))
    int8 = predictions(compile_int8(quantize(model, calibration, input_size=size), calibration[0][:1]), test)
    results = {"pt2e": int8}
    if runtimes.available("onnxruntime"):
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            export_onnx(model, Path(tmp) / "f.onnx", size, check=("onnxruntime",))
            quantize_onnx(Path(tmp) / "f.onnx", Path(tmp) / "q.onnx", calibration, size)
            session = runtimes.load("onnxruntime", (Path(tmp) / "q.onnx").read_bytes())
        results["ort"] = predictions(lambda x: runtimes.run(session, x), test)
    for name, got in results.items():
        drop = 100 * (accuracy - float((got == labels).float().mean()))
        agreement = float((got == reference).float().mean())
        isa = _int8_isa()
        # The split has 360 images (0.28 points each) and the float32 model itself differs with the
        # thread count it trained with: drops of 0 to 0.56 points (2 images) were measured across
        # thread counts and ISAs. One point (under 4 images) bounds the accuracy; the 99 % top-1
        # agreement below is the sharper check.
        assert drop <= 1.0, (f"{name}: int8 accuracy {100 * accuracy - drop:.2f} % vs float32 {100 * accuracy:.2f} %, "
                             f"more than 1 point lower ({isa}, {torch.get_num_threads()} threads)")
        assert agreement >= 0.99, f"{name}: top-1 agreement with float32 {100 * agreement:.2f} % ({isa})"


def test_a_module_called_twice_quantizes():
    """ResNet's blocks apply one nn.ReLU twice; the X86 quantizer once refused it ("Input partition
    has more than one output node")."""
    from sparse_hetconv import SparseHetConv2d

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = SparseHetConv2d(16, 16, 4), SparseHetConv2d(16, 16, 4)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv2(self.relu(self.conv1(x))) + x)

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), Block()).eval()
    quantized = quantize(model, torch.randn(8, *SIZE), input_size=SIZE)
    weights = sum("dequantize_per_channel" in str(n.target) for n in quantized.graph.nodes)
    assert weights == 5, f"{weights} convolutions quantized, expected the stem and both branches of both layers"
