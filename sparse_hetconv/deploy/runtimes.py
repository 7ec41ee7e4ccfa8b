"""The inference runtimes a deployed HetConv model runs in: ONNX Runtime and OpenVINO.

Each is an optional dependency (``pip install 'sparse_hetconv[deploy]'``); asking for one that is
not installed is an ``ImportError`` naming the extra. Sessions are created for the CPU with a
given number of threads; :func:`run` feeds a float32 NCHW batch and returns the first output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .._checks import MissingExtraError

__all__ = ["RUNTIMES", "available", "load", "run"]

RUNTIMES = ("onnxruntime", "openvino")


def available(runtime: str) -> bool:
    """Whether ``runtime`` ("onnxruntime" or "openvino") imports here."""
    _check(runtime)
    try:
        __import__("onnxruntime" if runtime == "onnxruntime" else "openvino")
    except ImportError:
        return False
    return True


def _check(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime ({runtime!r}) must be one of {RUNTIMES}")


def _require(runtime: str):
    try:
        return __import__("onnxruntime" if runtime == "onnxruntime" else "openvino")
    except ImportError as error:
        raise MissingExtraError(f"{runtime} is not installed: pip install 'sparse_hetconv[deploy]' "
                          f"(or pip install {runtime})") from error


class _Session:
    """A loaded model: ``session(x) -> numpy array`` for an ``(N, C, H, W)`` float32 array."""

    def __init__(self, runtime: str, model: str | bytes, threads: int | None) -> None:
        self.runtime = runtime
        threads = threads or torch.get_num_threads()
        if runtime == "onnxruntime":
            ort = _require(runtime)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # No busy-waiting between runs: spinning workers steal the cores from whatever runs next
            # (PyTorch, another session), which skews any interleaved timing.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            self._input = self._session.get_inputs()[0].name
        else:
            ov = _require(runtime)
            core = ov.Core()
            if isinstance(model, bytes):
                ir = core.read_model(model=model, weights=b"")
            else:
                ir = core.read_model(str(model))
            config = {"INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY",
                      "INFERENCE_PRECISION_HINT": "f32"}
            self._compiled = core.compile_model(ir, "CPU", config)
            self._request = self._compiled.create_infer_request()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.runtime == "onnxruntime":
            return self._session.run(None, {self._input: x})[0]
        result = self._request.infer({0: x})
        return np.asarray(next(iter(result.values())))


def load(runtime: str, model: str | Path | bytes, threads: int | None = None) -> _Session:
    """Load an ONNX model (a file, or its serialized bytes) into ``runtime`` for the CPU.

    OpenVINO runs float32 models in float32 (``INFERENCE_PRECISION_HINT=f32``: on a CPU with AMX or
    AVX-512-BF16 it would otherwise compute them in bfloat16).

    Raises:
        ValueError: an unknown runtime. ImportError: the runtime is not installed.
    """
    _check(runtime)
    return _Session(runtime, model if isinstance(model, bytes) else str(model), threads)


def run(session: _Session, x: torch.Tensor) -> torch.Tensor:
    """``session`` applied to a tensor batch; the result as a tensor."""
    return torch.from_numpy(np.array(session(x.detach().float().contiguous().numpy())))
