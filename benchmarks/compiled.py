"""torch.compile against eager: VGG-16 / CIFAR-10 at several P, the registered operator under Inductor.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. Since the CPU kernels are the
registered operator ``torch.ops.sparse_hetconv.het_conv2d``, ``torch.compile`` keeps them (it used
to run ``blocked`` under graph capture) and Inductor fuses BatchNorm, ReLU and pooling around them.
This measures what that buys: per P, the sparse model (``to_sparse``'s default, ``backend="auto"``)
and, with ``--masked``, the masked model (the published gwc + pwc layout), eager and compiled (``torch.compile``,
default mode), in interleaved rounds: an eval forward (``no_grad``) and a training step (forward,
cross-entropy, backward, SGD with momentum), channels-last, batch ``--batch``. Reported: medians and the median
of per-round ratios. Compilation time is reported separately (it happens once per model and mode).

Run: ``MALLOC_MMAP_THRESHOLD_=33554432 python -m benchmarks.compiled [--parts 4 64] [--rounds 7]``
(writes ``benchmarks/results/compiled.json`` and ``.md``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from sparse_hetconv.models import create_model

from . import RESULTS
from .harness.machine import machine_info, pin_mmap_threshold


def _models(part: int, form: str, compiled: bool):
    """(eval model, train model, optimizer) of one variant; the two models share their weights."""
    torch.manual_seed(0)
    model = create_model("vgg16_cifar", part=part, form=form).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    run = torch.compile(model) if compiled else model
    return model, run, optimizer


def _step(model: nn.Module, run, optimizer, x, y, train: bool) -> None:
    if train:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(run(x), y).backward()
        optimizer.step()
    else:
        model.eval()
        with torch.no_grad():
            run(x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compiled", description=__doc__.split("\n")[0])
    parser.add_argument("--parts", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--masked", action="store_true",
                        help="also the masked model, eager and compiled (two more compilations per P)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "compiled.json", help="JSON (and .md beside it)")
    args = parser.parse_args(argv)
    pin_mmap_threshold()
    machine = machine_info()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    rows = []
    for part in args.parts:
        # Each P is a new model through the same forward code: without a reset, dynamo's recompile
        # limit (8 graphs per code object, grad mode included) sends the later P back to eager.
        torch._dynamo.reset()
        variants = {}
        for form in ("sparse", "masked") if args.masked else ("sparse",):
            for compiled in (False, True):
                name = f"{form}{' compiled' if compiled else ''}"
                model, run, optimizer = _models(part, form, compiled)
                start = time.perf_counter()
                for train in (False, True):  # compile (or, eager, let auto choose) both modes once
                    _step(model, run, optimizer, x, y, train)
                variants[name] = (model, run, optimizer, time.perf_counter() - start)
        times = {(name, train): [] for name in variants for train in (False, True)}
        for _ in range(args.rounds):
            for train in (False, True):
                for name, (model, run, optimizer, _) in variants.items():
                    start = time.perf_counter()
                    _step(model, run, optimizer, x, y, train)
                    times[name, train].append(time.perf_counter() - start)
        for train in (False, True):
            ms = {name: 1e3 * statistics.median(times[name, train]) for name in variants}
            ratio = statistics.median(e / c for e, c in zip(times["sparse", train], times["sparse compiled", train]))
            over_masked = statistics.median(
                p / s for p, s in zip(times["masked compiled", train], times["sparse compiled", train])) if args.masked \
                else None
            rows.append({"part": part, "mode": "training step" if train else "eval forward", "ms": ms,
                         "compiled_speedup": ratio, "compiled_over_masked_compiled": over_masked,
                         "first_calls_s": {name: v[3] for name, v in variants.items()}})
            print(f"P={part} {rows[-1]['mode']}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
                  + f"; eager/compiled {ratio:.2f}x"
                  + (f"; masked compiled/sparse compiled {over_masked:.2f}x" if args.masked else ""),
                  flush=True)
    out = {"machine": machine, "batch": args.batch, "rounds": args.rounds, "rows": rows,
           "command": " ".join(["python -m benchmarks.compiled"] + (sys.argv[1:] if argv is None else argv))}
    args.out.write_text(json.dumps(out, indent=1))
    lines = [f"# torch.compile vs eager, VGG-16 / CIFAR-10, batch {args.batch}, channels-last", "",
             f"{machine['cpu']} ({machine['isa']}), {machine['threads']} threads, torch {machine['torch']}, "
             f"1-minute load average {machine['load_average']:.1f}; `{out['command']}`, {args.rounds} interleaved rounds.", "",
             "| P | mode | sparse eager (ms) | sparse compiled (ms) | eager / compiled | masked eager (ms) | "
             "masked compiled (ms) | masked compiled / sparse compiled |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = r["ms"]
        masked = (f"{ms['masked']:.1f} | {ms['masked compiled']:.1f} | {r['compiled_over_masked_compiled']:.2f}x"
                  if args.masked else "— | — | —")
        lines.append(f"| {r['part']} | {r['mode']} | {ms['sparse']:.1f} | {ms['sparse compiled']:.1f} | "
                     f"{r['compiled_speedup']:.2f}x | {masked} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
