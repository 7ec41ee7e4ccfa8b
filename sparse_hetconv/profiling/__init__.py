"""Measuring tools: latency, memory, malloc tuning, machine facts, verdicts and the benchmark (opt-in import).

``import sparse_hetconv`` does not import this package; ``from sparse_hetconv import profiling``
does. Used by the demo, the benchmark (:mod:`sparse_hetconv.profiling.bench`, ``sparse-hetconv
bench``) and the notebooks. Timings warm up first, use ``time.perf_counter``, synchronise CUDA when
the tensors live there, interleave the variants being compared and report medians.

* :mod:`.timing`: :func:`measure_latency`, :func:`interleaved_latency`.
* :mod:`.memory`: :func:`parameter_bytes`, :func:`state_bytes`, :func:`tensor_peak_bytes`,
  :func:`peak_training_memory`.
* :mod:`.malloc`: :func:`pin_mmap_threshold`, :func:`mmap_threshold_pinned`.
* :mod:`.machine`: :func:`machine_info`, :func:`cpu_isa`, :func:`sgemm_gflops`.
* :mod:`.compare`: :func:`latency_vs_part`, :func:`memory_vs_part`, :func:`vgg_training_step`.
* :mod:`.verdict`: :func:`speedup`, :func:`speedup_text`, :func:`flag_implausible`,
  :func:`busy_machine` (is it faster, with its spread; can the timing be real; is the machine quiet).
"""

from .compare import latency_vs_part, memory_vs_part, vgg_training_step
from .machine import cpu_isa, machine_info, sgemm_gflops
from .malloc import MMAP_THRESHOLD, TRIM_THRESHOLD, mmap_threshold_pinned, pin_mmap_threshold
from .memory import parameter_bytes, peak_training_memory, state_bytes, tensor_peak_bytes
from .timing import interleaved_latency, measure_latency
from .verdict import busy_machine, flag_implausible, speedup, speedup_text

__all__ = [
    "MMAP_THRESHOLD",
    "TRIM_THRESHOLD",
    "busy_machine",
    "cpu_isa",
    "flag_implausible",
    "interleaved_latency",
    "latency_vs_part",
    "machine_info",
    "measure_latency",
    "memory_vs_part",
    "mmap_threshold_pinned",
    "parameter_bytes",
    "peak_training_memory",
    "pin_mmap_threshold",
    "sgemm_gflops",
    "speedup",
    "speedup_text",
    "state_bytes",
    "tensor_peak_bytes",
    "vgg_training_step",
]
