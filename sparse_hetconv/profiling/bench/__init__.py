"""The latency and memory benchmark of every HetConv form on VGG-16 / CIFAR-10 (``sparse-hetconv bench``).

* :mod:`.run`: the driver (timing sets, memory in fresh processes, profiles; writes ``bench.json``).
* :mod:`.variants`: every form being compared, built from the same weights.
* :mod:`.published`: the published "efficient" HetConv and the per-filter loop, as their authors
  wrote them (the reference the speed-ups are measured against).
* :mod:`.report`: markdown tables, target verdicts and the plot from a ``bench.json``.

Importing this package loads nothing (the driver needs tqdm and matplotlib; the references in
:mod:`.published` need torch only, so a bare GPU machine can use them).
"""
