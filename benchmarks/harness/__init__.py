"""The benchmark harness the drivers in ``benchmarks/`` and the notebooks run (not part of the package).

* :mod:`.run`: the latency and memory benchmark of every HetConv form on VGG-16 / CIFAR-10
  (``python -m benchmarks.bench``); :mod:`.variants` every form being compared, built from the same
  weights; :mod:`.published` the published "efficient" HetConv and the per-filter loop, as their
  authors wrote them; :mod:`.report` its markdown tables, target verdicts and plots.
* :mod:`.deploy`: the deployment benchmark (``python -m benchmarks.deploy``); :mod:`.deploy_report`.
* :mod:`.options`: both drivers' command-line options.
* For the notebooks: :mod:`.compare` (latency and memory against P), :mod:`.verdict` (speed-ups
  with their spread, implausible timings, a busy machine), :mod:`.machine` (CPU, ISA, float32
  peak, glibc's malloc thresholds pinned for timing).

Built on the package's measuring tools (:mod:`sparse_hetconv.profiling`: latency, memory).
Importing this package loads nothing (the benchmark needs tqdm and matplotlib; :mod:`.published`
needs torch only, so a bare GPU machine can use it).
"""
