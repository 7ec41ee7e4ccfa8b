"""``export_onnx``: a HetConv model to an ONNX file that ONNX Runtime and OpenVINO run, checked first.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. The model's HetConv layers are
written as stock operators in the form measured fastest for the target runtime (:data:`BEST_FORM`,
docs/performance.md "Deployment"), BatchNorms folded; the file is checked against the PyTorch
model on a random probe in every requested runtime before it is written (atomically), and refused
with the largest difference when a runtime computes something else.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._checks import MissingExtraError, check_model
from .._files import atomic_write, check_output_file
from . import runtimes
from .forms import FORMS, export_form, hetconv_layers

__all__ = ["BEST_FORM", "TOLERANCE", "ExportResult", "check_input_size", "count_hetconv", "export_onnx", "onnx_bytes"]

#: The export form per runtime: the fastest measured on VGG-16 / CIFAR-10 (benchmarks/deploy.py).
BEST_FORM = {"onnxruntime": "folded", "openvino": "folded"}
#: The largest difference allowed between a runtime's output and PyTorch's, relative to the
#: output's largest magnitude (float32 runtimes reorder sums; a plain export measured 1.5e-4).
TOLERANCE = 1e-3


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote: the file, the form of its HetConv layers, the largest
    difference to the PyTorch model in each runtime checked (relative to the output's largest
    magnitude) and the number of HetConv layers."""

    path: Path
    form: str
    layers: int
    differences: dict[str, float] = field(default_factory=dict)
    bytes: int = 0

    def __str__(self) -> str:
        checks = ", ".join(f"{r}: {d:.1e}" for r, d in self.differences.items()) or "not checked"
        return (f"wrote {self.path} ({self.bytes / 2**20:.1f} MiB): {self.layers} HetConv layers as '{self.form}', "
                f"largest difference to PyTorch (of the output's magnitude) {checks}")


def check_input_size(input_size) -> tuple[int, int, int]:
    """``(C, H, W)`` as a tuple of three ints >= 1, else a ValueError naming it."""
    if (not isinstance(input_size, (tuple, list)) or len(input_size) != 3
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in input_size)):
        raise ValueError(f"input_size ({input_size!r}) must be three ints >= 1: channels, height, width")
    return tuple(input_size)


class _Named(nn.Module):
    """``forward(input)``: the exported graph's input is called ``input``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.model(input)


def onnx_bytes(model: nn.Module, input_size, dynamic_batch: bool = True, batch: int = 2) -> bytes:
    """``model`` (stock operators, eval mode) exported with ``torch.onnx.export`` (the dynamo
    exporter), serialized; the input is ``input`` (batch dimension ``batch`` when dynamic)."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
        import onnx  # noqa: F401
    except ImportError as error:
        raise MissingExtraError("ONNX export needs onnx and onnxscript: pip install 'sparse_hetconv[deploy]'") from error
    example = torch.randn((batch,) + tuple(input_size))
    shapes = {"input": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_Named(model).eval(), (example,), input_names=["input"], output_names=["output"],
                                    dynamic_shapes=shapes, dynamo=True, verbose=False, optimize=True)
    buffer = io.BytesIO()
    program.save(buffer)
    return buffer.getvalue()


def _difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = float(expected.abs().max().clamp(min=1e-12))
    if got.shape != expected.shape:
        return float("inf")
    return float((got.float() - expected.float()).abs().max()) / scale


def export_onnx(model: nn.Module, path, input_size, dynamic_batch: bool = True, *, runtime: str = "onnxruntime",
                form: str | None = None, check: tuple[str, ...] | None = None, force: bool = True,
                seed: int = 0) -> ExportResult:
    """Export a HetConv model (any form) to ONNX, check it in the runtimes, then write it.

    Args:
        model (nn.Module): the model; HetConv layers in any form :func:`~sparse_hetconv.to_sparse`
            reads (sparse, masked, the published ``gwc``/``pwc``), before or after ``fuse_bn``.
        path (str or Path): the ``.onnx`` file to write (its folder must exist).
        input_size (tuple): ``(C, H, W)`` of one input.
        dynamic_batch (bool): a dynamic batch dimension (else the file takes batches of 2).
        runtime (str): the runtime the file is for (``"onnxruntime"`` or ``"openvino"``): picks the
            form of the HetConv layers (:data:`BEST_FORM`).
        form (str, optional): force a form of :data:`~sparse_hetconv.deploy.forms.FORMS`.
        check (tuple of str, optional): the runtimes to check the file in (default: ``runtime``,
            and the other one where it is installed).
        force (bool): overwrite an existing file.
        seed (int): of the random probe.

    Returns:
        ExportResult.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a bad argument, or a runtime whose output differs from PyTorch's by more than
            :data:`TOLERANCE` of its magnitude (the message gives the largest difference; nothing is
            written).
        ImportError: onnx, onnxscript or a runtime to check in is not installed (the message names
            the extra to install).
        OSError: ``path`` is a folder, its folder does not exist or is not writable, or it exists
            and ``force`` is False.
    """
    check_model(model)
    size = check_input_size(input_size)
    if runtime not in runtimes.RUNTIMES:
        raise ValueError(f"runtime ({runtime!r}) must be one of {runtimes.RUNTIMES}")
    if form is not None and form not in FORMS:
        raise ValueError(f"form ({form!r}) must be one of {FORMS}")
    checks = tuple(check) if check is not None else (runtime,) + tuple(
        r for r in runtimes.RUNTIMES if r != runtime and runtimes.available(r))
    for name in checks:
        if name not in runtimes.RUNTIMES:
            raise ValueError(f"check holds {name!r}, expected runtimes of {runtimes.RUNTIMES}")
    path = check_output_file(path, force)
    form = form or BEST_FORM[runtime]
    was_training = model.training
    model.eval()  # what is deployed is the model in eval mode; its own mode is restored below
    try:
        probe = torch.randn((2,) + size, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected = model(probe).float()
        exported = export_form(model, form)
        layers = sum(1 for m in exported.modules() if type(m).__name__ == "ExportHetConv2d")
        data = onnx_bytes(exported, size, dynamic_batch)
    finally:
        model.train(was_training)
    differences = {}
    for name in checks:
        session = runtimes.load(name, data)
        differences[name] = _difference(runtimes.run(session, probe), expected)
        if not differences[name] <= TOLERANCE:
            raise ValueError(f"{name} computes the exported model differently: largest difference "
                             f"{differences[name]:.3g} of the output's magnitude (allowed {TOLERANCE:g}); "
                             f"nothing was written to {path}")
    atomic_write(path, lambda f: f.write(data))
    return ExportResult(Path(path), form, layers, differences, len(data))


def count_hetconv(model: nn.Module) -> int:
    """The HetConv layers (part > 1) of ``model`` in any form (0: not a HetConv model)."""
    from ..convert import to_sparse

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="to_sparse: the model has no layer to convert")
            layers = hetconv_layers(to_sparse(model, memory_format=None))
    except (ValueError, TypeError):
        return 0
    return sum(1 for layer in layers.values() if layer.part > 1)
