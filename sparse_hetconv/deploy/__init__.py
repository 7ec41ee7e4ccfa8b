"""Deploying HetConv models: ONNX export, int8 quantization, ONNX Runtime and OpenVINO.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. A tool layer above the core,
imported on request (``import sparse_hetconv.deploy``; ``import sparse_hetconv`` does not load it)
and backed by the ``deploy`` extra (``pip install 'sparse_hetconv[deploy]'``: onnx, onnxscript,
onnxruntime, openvino, torchao, scikit-learn):

* :func:`export_onnx` — any HetConv model to an ONNX file, its HetConv layers in the form measured
  fastest for the target runtime, checked in ONNX Runtime and OpenVINO before it is written;
* :func:`quantize` / :func:`compile_int8` — post-training static int8 with PT2E (torchao's X86
  Inductor quantizer) and Inductor's int8 kernels; :func:`quantize_onnx` — QDQ int8 for ONNX Runtime;
* :func:`export_form` — a model's HetConv layers as stock operators (:mod:`.forms`);
* :func:`calibration_batches` and :func:`digits` — calibration and test data with no download;
* :mod:`.runtimes` — loading and running ONNX files in either runtime.

The command line: ``sparse-hetconv export CHECKPOINT --out FILE`` (docs/deploy.md).
"""

from .calibration import calibration_batches, digits
from .forms import FORMS, ExportHetConv2d, export_form
from .onnx_export import BEST_FORM, TOLERANCE, ExportResult, export_onnx
from .quantize import compile_int8, quantize, quantize_onnx

__all__ = ["BEST_FORM", "FORMS", "TOLERANCE", "ExportHetConv2d", "ExportResult", "calibration_batches",
           "compile_int8", "digits", "export_form", "export_onnx", "quantize", "quantize_onnx"]
