"""Post-training static int8 quantization of HetConv models with the ecosystem's own tools.

* :func:`quantize` — PT2E (torchao's ``prepare_pt2e`` / ``convert_pt2e``, ``X86InductorQuantizer``):
  the model's export form is captured with ``torch.export``, calibrated, and converted to int8
  weights (per output channel) and activations (per tensor); :func:`compile_int8` lowers it with
  Inductor onto oneDNN's int8 convolutions.
* :func:`quantize_onnx` — an ONNX file to QDQ int8 with ``onnxruntime.quantization``.

A model that cannot be captured is a ``ValueError`` naming the smallest module that fails. On CPUs
without VNNI (or oneDNN capped below it) x86 int8 kernels saturate pairs of products at 16 bits, so
both routes then quantize with a reduced range, as their documentation advises
(:func:`reduced_range`; with the full range the digits test's top-1 agreement fell to 97.5 %).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from .._checks import MissingExtraError, check_model
from .._files import atomic_write, check_output_file
from .._frozen import FrozenCompiled
from .calibration import calibration_batches
from .forms import export_form
from .onnx_export import check_input_size

__all__ = ["compile_int8", "quantize", "quantize_onnx", "reduced_range", "vnni"]

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that leave out AVX-512 VNNI; AVX2_VNNI caps count as without
# it too (torch cannot say whether the CPU has AVX-VNNI, and the reduced range is the safe side).
_CAPS_WITHOUT_VNNI = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE")


def vnni() -> bool:
    """Whether oneDNN's int8 kernels use VNNI (or AMX) here: the CPU has AVX-512 VNNI and
    ``ONEDNN_MAX_CPU_ISA`` does not cap oneDNN below it."""
    import os

    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    return bool(torch.cpu._is_vnni_supported()) and cap not in _CAPS_WITHOUT_VNNI


def reduced_range() -> bool:
    """Whether :func:`quantize` and :func:`quantize_onnx` use a reduced range by default here (no
    VNNI: see the module docstring)."""
    return not vnni()


def _require_torchao():
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as error:
        raise MissingExtraError("PT2E quantization needs torchao: pip install 'sparse_hetconv[deploy]'") from error
    return prepare_pt2e, convert_pt2e, xiq


def _inputs_by_module(model: nn.Module, x: torch.Tensor) -> dict[str, tuple]:
    """The positional inputs each submodule received in one eager call."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, args)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _failing_module(model: nn.Module, x: torch.Tensor) -> tuple[str, str]:
    """The deepest module that ``torch.export`` cannot capture on the input it gets, and why."""
    inputs = _inputs_by_module(model, x)
    failing = []
    for name, module in model.named_modules():
        if name not in inputs or not name:
            continue
        try:
            torch.export.export(copy.deepcopy(module).eval(), inputs[name])
        except Exception as error:  # noqa: BLE001  (any capture failure; the message is reported)
            failing.append((name.count("."), name, f"{type(module).__name__}: {str(error).splitlines()[0][:300]}"))
    if not failing:
        return "", "the whole model fails, none of its modules alone"
    depth, name, why = max(failing, key=lambda f: f[0])
    return name, why


_STATELESS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Hardswish, nn.Tanh)
_STATELESS_NAMES = {f"{c.__module__}.{c.__qualname__}" for c in _STATELESS}  # how nn_module_stack names them


def _split_reused_activations(gm):
    """Give each call of a stateless activation module its own source partition.

    The X86 quantizer groups nodes into patterns by the module they come from; a module called twice
    (ResNet's blocks apply one ``self.relu`` after the first convolution and after the sum) is one
    partition with two outputs, which it cannot annotate ("Input partition has more than one output
    node"). Naming each call's source after its node makes every call a pattern of its own.
    """
    for node in gm.graph.nodes:
        stack = node.meta.get("source_fn_stack")  # strict export
        if stack and isinstance(stack[-1][1], type) and issubclass(stack[-1][1], _STATELESS):
            name, kind = stack[-1]
            node.meta["source_fn_stack"] = [*stack[:-1], (f"{name}__{node.name}", kind)]
        modules = node.meta.get("nn_module_stack")  # non-strict export (the default): the innermost module
        if modules and node.op == "call_function":
            key, (fqn, kind) = list(modules.items())[-1]
            if (kind in _STATELESS_NAMES) if isinstance(kind, str) else (isinstance(kind, type) and issubclass(kind, _STATELESS)):
                modules = dict(modules)
                modules[key] = (f"{fqn}__{node.name}", kind)
                node.meta["nn_module_stack"] = modules
    return gm


def quantize(model: nn.Module, calibration, backend: str = "x86", input_size=None, *, form: str = "masked",
             batches: int = 8, batch: int = 32, reduce_range: bool | None = None):
    """Post-training static int8 quantization with PT2E and the X86 Inductor quantizer.

    Args:
        model (nn.Module): a HetConv model in any form (eval-mode semantics are quantized).
        calibration: what :func:`~sparse_hetconv.deploy.calibration.calibration_batches` takes
            (``"digits"``, a folder, a tensor or tensors).
        backend (str): ``"x86"`` (the X86 Inductor quantizer; the only one).
        input_size (tuple, optional): ``(C, H, W)``; default: the calibration images' size.
        form (str): the export form of the HetConv layers (:mod:`.forms`).
        batches, batch (int): at most ``batches`` calibration batches of ``batch`` images.
        reduce_range (bool, optional): 7-bit activations (default: :func:`reduced_range`, True
            where the int8 kernels have no VNNI and the full range would saturate).

    Returns:
        torch.fx.GraphModule: the quantized model (quantize / dequantize around int8 tensors);
        run it as it is (reference arithmetic) or through :func:`compile_int8` (int8 kernels).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a bad argument, calibration data that is empty or of the wrong shape, or a
            model that cannot be captured (the message names the module).
        ImportError: torchao is not installed.
    """
    check_model(model)
    if backend != "x86":
        raise ValueError(f"backend ({backend!r}) must be 'x86' (the X86 Inductor quantizer)")
    if isinstance(calibration, str) and calibration == "digits" and input_size is None:
        raise ValueError("input_size is needed with the 'digits' calibration set (it is resized to it)")
    prepare_pt2e, convert_pt2e, xiq = _require_torchao()
    if input_size is None:
        first = calibration if isinstance(calibration, torch.Tensor) else None
        if first is None:
            raise ValueError("input_size is needed unless calibration is a tensor")
        input_size = tuple(first.shape[1:])
    size = check_input_size(tuple(input_size))
    data = calibration_batches(calibration, size, batch=batch, count=batches * batch)
    exported = export_form(model, form)
    example = data[0][:2].contiguous()
    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    try:
        program = torch.export.export(exported, (example,), dynamic_shapes=({0: batch_dim},))
    except Exception as error:  # noqa: BLE001
        where, why = _failing_module(exported, example)
        raise ValueError(f"cannot quantize: torch.export fails in module '{where or '<root>'}' ({why})") from error
    quantizer = xiq.X86InductorQuantizer()
    if reduce_range is None:
        reduce_range = reduced_range()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(reduce_range=bool(reduce_range)))
    prepared = prepare_pt2e(_split_reused_activations(program.module()), quantizer)
    with torch.no_grad():
        for x in data:
            prepared(x.contiguous())
    return convert_pt2e(prepared)


def compile_int8(quantized, example: torch.Tensor | None = None) -> nn.Module:
    """``torch.compile`` a :func:`quantize`'d model with Inductor's freezing, the lowering of the
    quantize / dequantize pairs into oneDNN int8 convolutions (call it under ``torch.no_grad``);
    ``example`` is run once to compile. Freezing applies to this model's compilations only
    (:class:`sparse_hetconv._frozen.FrozenCompiled`): the process's Inductor settings are unchanged."""
    compiled = FrozenCompiled(quantized)
    if example is not None:
        with torch.no_grad():
            compiled(example)
    return compiled


class _Reader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over calibration batches."""

    def __init__(self, name: str, data) -> None:
        self._items = iter([{name: x.numpy()} for x in data])

    def get_next(self):
        return next(self._items, None)


def quantize_onnx(source, target, calibration, input_size, *, force: bool = True, batches: int = 8,
                  batch: int = 32, reduce_range: bool | None = None) -> Path:
    """An ONNX float model to QDQ int8 (``onnxruntime.quantization.quantize_static``).

    Weights int8 per output channel, activations uint8 per tensor (``MinMax`` calibration), in the
    QDQ format that ONNX Runtime's CPU provider fuses into its int8 kernels. Written atomically.

    Args:
        source (str or Path): the float ONNX file (e.g. :func:`~sparse_hetconv.deploy.export_onnx`'s).
        target (str or Path): the int8 ONNX file to write.
        calibration: as for :func:`quantize`. input_size (tuple): ``(C, H, W)``.
        reduce_range (bool, optional): 7-bit weights (default: :func:`reduced_range`).

    Raises:
        ValueError: empty or wrongly shaped calibration data. ImportError: onnxruntime missing.
        OSError: an unreadable source or an unwritable target.
    """
    try:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as error:
        raise MissingExtraError("ONNX quantization needs onnxruntime and onnx: pip install 'sparse_hetconv[deploy]'") \
            from error
    size = check_input_size(tuple(input_size))
    source, target = Path(source), check_output_file(target, force)
    if not source.is_file():
        raise FileNotFoundError(2, "no such ONNX file", str(source))
    data = calibration_batches(calibration, size, batch=batch, count=batches * batch)
    name = onnx.load(str(source), load_external_data=False).graph.input[0].name
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantized), _Reader(name, data), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        reduce_range=reduced_range() if reduce_range is None else bool(reduce_range))
        payload = quantized.read_bytes()
    atomic_write(target, lambda f: f.write(payload))
    return target
