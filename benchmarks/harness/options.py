"""The options of ``python -m benchmarks.bench`` and ``python -m benchmarks.deploy``."""

from __future__ import annotations

from pathlib import Path

from sparse_hetconv.cli import nonnegative_int, positive_int

from .. import RESULTS

#: What ``python -m benchmarks.bench --quick`` takes (:mod:`.run`'s QUICK_* settings), measured:
#: 5 min 54 s wall, 141 s of CPU, on a 2-core Xeon whose load average other work held at 10.
QUICK_BENCH = "under 6 minutes on 2 cores, measured with the cores shared with other work; less on a quiet machine"


def common(parser, quick: str) -> None:
    """The options both benchmarks take; ``quick``: the help of ``--quick``."""
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--parts", type=positive_int, nargs="+", help="parts to run")
    parser.add_argument("--batch", type=positive_int, default=32, help="batch of the large forward and training modes")
    parser.add_argument("--repeats", type=positive_int, help="timed rounds per set")
    parser.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed calls per variant and set "
                        "(default 2)")
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: all cores)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder (default benchmarks/results, "
                        "whose results docs/performance.md is regenerated from)")


def bench(parser) -> None:
    """The latency and memory benchmark's options."""
    from .run import PARTS, QUICK_PARTS
    from . import variants as V

    common(parser, f"short run: P = {', '.join(map(str, QUICK_PARTS))}, the first and last layer shapes, the core variants, "
                   f"2 rounds, memory at P=4 only, no profiles ({QUICK_BENCH})")
    parser.set_defaults(parts=None)
    parser.add_argument("--variants", nargs="+", help=f"subset of {', '.join(V.ALL)}")
    parser.add_argument("--levels", nargs="+", choices=("network", "layer"), default=["network", "layer"])
    parser.add_argument("--shapes", type=positive_int, help="time only the first N layer shapes")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler tables")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants "
                        "(about 15 s of compilation per model and batch size; always skipped with --quick)")
    parser.epilog = f"Default parts {PARTS}, 11 rounds (quick: 2)."


def deploy(parser) -> None:
    """The deployment benchmark's options."""
    common(parser, "short run: VGG-16 at P in {1, 4}, 3 rounds, 2 training epochs for the int8 accuracy")
    parser.add_argument("--models", nargs="+", choices=("vgg16_cifar", "resnet18"), help="models (default both)")
    parser.add_argument("--deploy-variants", nargs="+", help="subset of eager, compiled, ort_published, ort, "
                        "openvino, int8_pt2e, int8_ort")
    parser.add_argument("--no-forms", action="store_true", help="skip timing the export forms against each other")
    parser.add_argument("--no-accuracy", action="store_true", help="skip training on digits for the int8 accuracy")
