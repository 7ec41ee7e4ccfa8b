"""The "FLOP counters on VGG-16" table of docs/compatibility.md: every FLOP tool on every form.

VGG-16 for CIFAR-10, P = 4, one 32 x 32 image, eval mode, in millions of MACs (FlopCounterMode's
FLOPs / 2): ``count_macs`` (useful and executed), FlopCounterMode without and with autograd,
fvcore without and with ``fvcore_handles``, ptflops without and with ``ptflops_hooks``. Counting
only: nothing is timed, but which backend ``auto`` resolves to is measured on this machine, and
the table depends on it. ptflops gets the same random input as the others (its own is uninitialised
memory, whose inf and NaN send the masked layer down its non-finite path, which ptflops does not
see). Run: ``python -m benchmarks.flop_table`` (needs the dev extra).
"""

from __future__ import annotations

import io
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

from sparse_hetconv.counting import count_macs
from sparse_hetconv.flop_tools import fvcore_analysis, ptflops_hooks
from sparse_hetconv.models import vgg16_cifar

FORMS = ("masked", "auto", "fused", "dense", "grouped", "blocked", "torch_sparse")


def _flop_counter(model, x, grad: bool) -> int:
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(grad):
        model(x)
    return counter.get_total_flops() // 2


def _build(form: str):
    torch.manual_seed(0)
    return (vgg16_cifar(part=4, form="masked") if form == "masked" else vgg16_cifar(part=4, backend=form)).eval()


def row(form: str) -> list[float]:
    """The table's columns for one form, in millions of MACs; each tool counts a fresh model (one
    tool's tracing or hooks must not change what the next one sees)."""
    import ptflops
    from fvcore.nn import FlopCountAnalysis

    size = (1, 3, 32, 32)
    x = torch.randn(size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts = [count_macs(_build(form), size, norm=False), count_macs(_build(form), size, executed=True, norm=False),
                  _flop_counter(_build(form), x, grad=False), _flop_counter(_build(form), x, grad=True)]
        for analysis in (FlopCountAnalysis(_build(form), x), fvcore_analysis(_build(form), x)):
            counts.append(analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).total())
        for hooks in ({}, ptflops_hooks()):
            macs, _ = ptflops.get_model_complexity_info(_build(form), size[1:], as_strings=False, verbose=False,
                                                        print_per_layer_stat=False, ost=io.StringIO(),
                                                        custom_modules_hooks=hooks, input_constructor=lambda _: x)
            counts.append(macs)
    return [c / 1e6 for c in counts]


def main() -> None:
    print("| model | useful (`count_macs`) | executed (`count_macs(executed=True)`) | FlopCounterMode, no grad | "
          "FlopCounterMode, grad | fvcore | fvcore + `fvcore_handles` | ptflops | ptflops + `ptflops_hooks` |")
    print("|---|---|---|---|---|---|---|---|---|")
    for form in FORMS:
        name = "masked" if form == "masked" else f"sparse, `{form}`"
        print(f"| {name} | " + " | ".join(f"{value:.2f}" for value in row(form)) + " |", flush=True)


if __name__ == "__main__":
    main()
