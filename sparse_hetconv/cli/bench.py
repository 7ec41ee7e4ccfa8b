"""``sparse-hetconv bench``: the latency and memory benchmark (:mod:`sparse_hetconv.profiling.bench`)."""

from __future__ import annotations

import sys
from pathlib import Path

from . import nonnegative_int, positive_int


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="time and measure every HetConv form on VGG-16 / CIFAR-10",
        description="Latency (forward at batch 1 and --batch, training step), peak training memory and "
                    "training-state bytes of every HetConv form, per VGG-16 layer shape and for the whole "
                    "network, P in {1, 2, 4, 8, 16, 32, 64}. Pins glibc's malloc thresholds first.")
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    if args.deploy:
        from ..profiling.bench import deploy

        args.repeats = args.repeats or (3 if args.quick else 7)
        result, written = deploy.execute(args, progress=lambda line: print(line, file=sys.stderr))
        print(f"wrote {', '.join(str(p) for p in written)} in {result['seconds']:.0f} s")
        return 0
    from ..profiling.bench.run import execute, summary

    print(summary(*execute(args)))
    return 0


def add_arguments(parser) -> None:
    """The options of ``sparse-hetconv bench`` (also ``python -m benchmarks.bench``)."""
    from ..profiling.bench.run import PARTS
    from ..profiling.bench import variants as V

    parser.add_argument("--quick", action="store_true", help="short run: P in {2, 4, 64}, 3 layer shapes, "
                        "fewer repeats, memory at P=4 only (a few minutes)")
    parser.add_argument("--parts", type=positive_int, nargs="+", help=f"parts to run (default {PARTS})")
    parser.add_argument("--batch", type=positive_int, default=32, help="batch of the large forward and training modes")
    parser.add_argument("--repeats", type=positive_int, help="timed rounds per set (default 11, quick 5)")
    parser.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed calls per variant and set (default 2)")
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: all cores)")
    parser.add_argument("--variants", nargs="+", help=f"subset of {', '.join(V.ALL)}")
    parser.add_argument("--levels", nargs="+", choices=("network", "layer"), default=["network", "layer"])
    parser.add_argument("--shapes", type=positive_int, help="time only the first N layer shapes")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler tables")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants "
                        "(about 15 s of compilation per model and batch size; always skipped with --quick)")
    deploy = parser.add_argument_group("deployment (--deploy)")
    deploy.add_argument("--deploy", action="store_true", help="the deployment benchmark instead: VGG-16 and ResNet-18 "
                        "in PyTorch (eager, compiled), ONNX Runtime, OpenVINO and int8 (PT2E, ONNX Runtime); needs "
                        "the deploy extra")
    deploy.add_argument("--models", nargs="+", choices=("vgg16_cifar", "resnet18"), help="models (default both)")
    deploy.add_argument("--deploy-variants", nargs="+", help="subset of eager, compiled, ort_published, ort, "
                        "openvino, int8_pt2e, int8_ort")
    deploy.add_argument("--no-forms", action="store_true", help="skip timing the export forms against each other")
    deploy.add_argument("--no-accuracy", action="store_true", help="skip training on digits for the int8 accuracy")
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="output folder (default %(default)s; the repository's `make bench` uses benchmarks/results)")
