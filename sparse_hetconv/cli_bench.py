"""``sparse-hetconv bench``: the latency and memory benchmark of ``benchmarks/``.

The benchmark scripts live in the repository's ``benchmarks/`` folder (they are not part of the
installed package): the command looks for it beside the package (an editable install or a source
checkout) and in the current directory, and runs ``benchmarks/run_bench.py`` in this process.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def _benchmarks_dir() -> Path:
    candidates = [Path(__file__).resolve().parent.parent / "benchmarks", Path.cwd() / "benchmarks"]
    for folder in candidates:
        if (folder / "run_bench.py").is_file():
            return folder
    raise FileNotFoundError("benchmarks/run_bench.py not found beside the package or in the current directory "
                            f"(looked in {', '.join(str(c) for c in candidates)}); run from a source checkout")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="time and measure every HetConv form on VGG-16 / CIFAR-10 (writes benchmarks/results)",
        description="Latency (forward at batch 1 and --batch, training step), peak training memory and "
                    "training-state bytes of every HetConv form, per VGG-16 layer shape and for the whole "
                    "network, P in {1, 2, 4, 8, 16, 32, 64}. Pins glibc's malloc thresholds first.")
    try:
        folder = _benchmarks_dir()
    except FileNotFoundError:
        parser.set_defaults(func=_missing)
        return
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    run_bench = importlib.import_module("run_bench")
    run_bench.add_arguments(parser)
    parser.set_defaults(func=run_bench.run)


def _missing(args) -> int:
    _benchmarks_dir()  # raises FileNotFoundError with the places looked at
    return 2
