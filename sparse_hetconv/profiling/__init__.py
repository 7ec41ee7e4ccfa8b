"""Measuring tools: latency and memory (opt-in import).

``import sparse_hetconv`` does not import this package; ``from sparse_hetconv import profiling``
does. Used by the demo, the notebooks and the repository's benchmarks (``benchmarks/``, which
also holds the notebooks' comparisons and verdicts). FLOP and MAC counts are
:func:`sparse_hetconv.count_macs` and :mod:`sparse_hetconv.flop_tools`.

* :mod:`.timing`: :func:`measure_latency`, :func:`interleaved_latency` (warm-up, accelerator
  synchronisation, interleaved rounds, medians and quartiles).
* :mod:`.memory`: :func:`parameter_bytes`, :func:`state_bytes`, :func:`tensor_peak_bytes`,
  :func:`peak_training_memory`.
"""

from .memory import parameter_bytes, peak_training_memory, state_bytes, tensor_peak_bytes
from .timing import interleaved_latency, measure_latency

__all__ = ["interleaved_latency", "measure_latency", "parameter_bytes", "peak_training_memory", "state_bytes",
           "tensor_peak_bytes"]
