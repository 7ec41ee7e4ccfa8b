"""The repository's benchmark drivers, run from the repository root with ``python -m benchmarks.<name>``.

* :mod:`.bench` (``make bench``): the package's benchmark (``sparse-hetconv bench``) into
  ``benchmarks/results/``, then ``docs/performance.md`` from its result (:mod:`.docs_page`).
* :mod:`.count_tables`: MACs and parameters of VGG-16 and ResNets (``results/count_tables.*``).
* :mod:`.bench_spconv`: the submanifold layers against spconv (``results/spconv.*``).
* :mod:`.probe_cost`: what conversion by probing costs per layer (``results/probe_cost_*``).
* :mod:`.gpu_check` (``make gpu-check``): the CUDA tests and the GPU benchmark on one GPU.

Every output goes under ``benchmarks/results/``; nothing here is imported by the package or timed
by the tests.
"""

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
