"""The repository's benchmark drivers, run from the repository root with ``python -m benchmarks.<name>``.

* :mod:`.bench` (``make bench``): the latency and memory benchmark (:mod:`.harness.run`) into
  ``benchmarks/results/``, then ``docs/performance.md`` from its result (:mod:`.docs_page`);
  :mod:`.deploy` the deployment benchmark (:mod:`.harness.deploy`).
* :mod:`.harness`: the benchmarks' code and the notebooks' tools (comparisons, verdicts, machine facts).
* :mod:`.count_tables`: MACs and parameters of VGG-16 and ResNets (``results/count_tables.*``).
* :mod:`.bench_spconv`: the submanifold layers against spconv (``results/spconv.*``).
* :mod:`.probe_cost`: what conversion by probing costs per layer (``results/probe_cost_*``).
* :mod:`.gpu_check` (``make gpu-check``): the CUDA tests and the GPU benchmark on one GPU.
* :mod:`.notebooks`: runs ``notebooks/*.ipynb`` in full (or ``--quick``) mode, writing their outputs.
* :mod:`.flop_table`: the FLOP-tool table of ``docs/compatibility.md`` (counting only).
* :mod:`.bf16_step`: a float32 and a bfloat16-autocast training step (set ``ONEDNN_MAX_CPU_ISA=AVX2
  ATEN_CPU_CAPABILITY=avx2`` for a CPU without bfloat16 instructions).

Every output file goes under ``benchmarks/results/`` (but the notebooks, written in place; the
FLOP table and the bfloat16 step print theirs); nothing here is imported by the package or timed by
the tests (the notebook test runs :mod:`.notebooks` in quick mode, asserting no timing).
"""

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
