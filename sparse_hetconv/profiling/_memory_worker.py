"""The child process of :func:`sparse_hetconv.profiling.peak_training_memory`.

``python -m sparse_hetconv.profiling._memory_worker SPEC``: SPEC is the JSON of ``builder``
(``"module:function"``), ``kwargs``, ``steps``, ``path`` and ``threads`` (glibc's malloc thresholds
come from the environment the parent sets). The result is written to stdout as one line
``RESULT {json}``.
"""

from __future__ import annotations

import importlib
import json
import sys


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    sys.path[:0] = spec["path"]
    import torch

    from sparse_hetconv.profiling.memory import (_peak_rss_bytes, _reset_peak_rss, _rss_bytes, state_bytes,
                                                 tensor_peak_bytes)

    torch.set_num_threads(spec["threads"])
    module, _, name = spec["builder"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    base = _rss_bytes()
    reset = _reset_peak_rss()
    built = builder(**spec["kwargs"])
    after_build = _rss_bytes()
    for _ in range(spec["steps"]):
        built["step"]()
    peak = _peak_rss_bytes()
    tensor_peak = tensor_peak_bytes(built["step"], built["model"], built.get("optimizer"))
    result = {"peak_bytes": peak - base, "build_bytes": after_build - base, "baseline_bytes": base,
              "tensor_peak_bytes": tensor_peak, "state": state_bytes(built["model"], built.get("optimizer")),
              "peak_reset": reset}
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
