"""``sparse-hetconv bench``: the latency and memory benchmark (:mod:`sparse_hetconv.profiling.bench`)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    from ..profiling.bench.run import add_arguments

    parser = subparsers.add_parser(
        "bench", help="time and measure every HetConv form on VGG-16 / CIFAR-10",
        description="Latency (forward at batch 1 and --batch, training step), peak training memory and "
                    "training-state bytes of every HetConv form, per VGG-16 layer shape and for the whole "
                    "network, P in {1, 2, 4, 8, 16, 32, 64}. Pins glibc's malloc thresholds first.")
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..profiling.bench.run import execute, summary

    print(summary(*execute(args)))
    return 0
