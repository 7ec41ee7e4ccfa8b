"""Does ``backend="auto"`` hold on another CPU? The shipped model against the masked form, per ISA.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. The cost model behind
``auto`` was calibrated on one AVX-512 machine; on an AVX2-only EPYC the shipped sparse model once
ran 1.02-1.08x the masked form's time. This benchmark runs VGG-16 / CIFAR-10 (batch ``--batch``,
channels-last, float32) in a fresh process per instruction set — the machine's own, and capped at
AVX2 with ``ONEDNN_MAX_CPU_ISA=AVX2`` and ``MKL_ENABLE_INSTRUCTIONS=AVX2`` (oneDNN and MKL then
run their AVX2 kernels; cache sizes and core counts stay this machine's) — and times, interleaved:

* ``masked_cl``: the masked form, channels-last (the layer the sparse one replaces);
* ``sparse_model``: the sparse model with the backends the cost model alone picks (``"model"``);
* ``sparse_confirm``: the sparse model with the backends the default ``"confirm"`` mode picks
  (the model's proposals kept only where a timing on this machine confirms them).

Each variant's backends are resolved once per mode (training, inference) and pinned, so the
timings compare the choices, not the cost of choosing. Reported per P: a training step
(forward, cross-entropy, backward, SGD with momentum), an eval forward (``no_grad``) and the
train-then-evaluate loop a user runs (one of each), medians over interleaved rounds and the median
of per-round ratios to ``masked_cl``.

Run: ``MALLOC_MMAP_THRESHOLD_=33554432 python -m benchmarks.auto_isa [--parts 2 4 8] [--rounds 9]``
(writes ``benchmarks/results/auto_isa.json`` and ``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import RESULTS

ISAS = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
VARIANTS = ("masked_cl", "sparse_model", "sparse_confirm")


def child(args) -> dict:
    import torch

    from sparse_hetconv import autotune, to_sparse
    from sparse_hetconv.models import vgg16_cifar
    from sparse_hetconv.profiling import interleaved_latency, machine_info, pin_mmap_threshold

    pin_mmap_threshold()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (args.batch,))
    rows, picks = [], {}
    for part in args.parts:
        masked = vgg16_cifar(part=part, form="masked").eval()
        models = {"masked_cl": masked}
        pins = {}
        for mode in ("model", "confirm"):
            model = to_sparse(masked)
            autotune.clear()
            with autotune.mode(mode):
                pins[mode] = {training: autotune.resolve_backends(model, x, training=training)
                              for training in (True, False)}
            models[f"sparse_{mode}"] = model
        picks[part] = {mode: {("train" if t else "eval"): sorted(set(p.values())) for t, p in by.items()}
                       for mode, by in pins.items()}
        optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for name, m in models.items()}

        def pin(name: str, training: bool) -> None:
            if name.startswith("sparse_"):
                for layer, backend in pins[name.removeprefix("sparse_")][training].items():
                    models[name].get_submodule(layer).backend = backend

        def train(name: str):
            def run():
                pin(name, True)
                model = models[name].train()
                optimizers[name].zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), target).backward()
                optimizers[name].step()
            return run

        def evaluate(name: str):
            def run():
                pin(name, False)
                model = models[name].eval()
                with torch.no_grad():
                    model(x)
            return run

        def loop(name: str):
            step, forward = train(name), evaluate(name)
            return lambda: (step(), forward())

        for what, make in (("train", train), ("eval", evaluate), ("train_then_eval", loop)):
            stats = interleaved_latency({name: make(name) for name in VARIANTS}, warmup=2, repeats=args.rounds)
            base = stats["masked_cl"]["times_ms"]
            for name in VARIANTS:
                ratios = [a / b for a, b in zip(stats[name]["times_ms"], base)]
                rows.append({"part": part, "what": what, "variant": name, "median_ms": stats[name]["median_ms"],
                             "vs_masked": statistics.median(ratios), "q1_ratio": statistics.quantiles(ratios, n=4)[0],
                             "q3_ratio": statistics.quantiles(ratios, n=4)[2]})
    return {"machine": machine_info(), "isa_cap": os.environ.get("ONEDNN_MAX_CPU_ISA"), "rows": rows, "picks": picks}


def markdown(result: dict) -> str:
    lines = ["# `backend=\"auto\"` on two instruction sets: VGG-16 / CIFAR-10", "",
             f"Command: `{result['command']}` ({result['seconds'] / 60:.1f} min). CPU: {result['cpu']}; "
             f"{result['threads']} threads, batch {result['batch']}, float32, channels-last; {result['rounds']} "
             "interleaved rounds, medians; ratio = median of per-round ratios to `masked_cl` (lower is faster).", ""]
    for isa, run in result["runs"].items():
        cap = run["isa_cap"] or "none"
        lines += [f"## {isa}: oneDNN ISA cap {cap} (the CPU itself: {run['machine']['isa']})", "",
                  "| P | step | masked_cl ms | sparse_model ms (ratio) | sparse_confirm ms (ratio) |",
                  "|---:|---|---:|---:|---:|"]
        table = {(r["part"], r["what"], r["variant"]): r for r in run["rows"]}
        for part in result["parts"]:
            for what in ("train", "eval", "train_then_eval"):
                cells = [f"{table[(part, what, 'masked_cl')]['median_ms']:.1f}"]
                for name in ("sparse_model", "sparse_confirm"):
                    row = table[(part, what, name)]
                    cells.append(f"{row['median_ms']:.1f} ({row['vs_masked']:.3f})")
                lines.append(f"| {part} | {what} | " + " | ".join(cells) + " |")
        lines += ["", "Backends picked (training / inference):", ""]
        for part, by_mode in run["picks"].items():
            text = "; ".join(f"{mode}: {', '.join(p['train'])} / {', '.join(p['eval'])}" for mode, p in by_mode.items())
            lines.append(f"* P={part}: {text}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.auto_isa", description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--isa", nargs="+", choices=sorted(ISAS), default=list(ISAS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sys.stdout.write("RESULT " + json.dumps(child(args)) + "\n")
        return 0
    start = time.perf_counter()
    runs = {}
    for isa in args.isa:
        command = [sys.executable, "-m", "benchmarks.auto_isa", "--child", "--batch", str(args.batch), "--rounds",
                   str(args.rounds), "--parts", *map(str, args.parts)] + (["--threads", str(args.threads)] if args.threads else [])
        env = dict(os.environ, **ISAS[isa])
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.stderr.write(done.stderr[-3000:])
            return 1
        runs[isa] = json.loads(lines[-1][len("RESULT "):])
        sys.stderr.write(f"{isa}: done\n")
    first = next(iter(runs.values()))
    result = {"command": " ".join(["python -m benchmarks.auto_isa", *(argv if argv is not None else sys.argv[1:])]),
              "seconds": time.perf_counter() - start, "cpu": first["machine"]["cpu"],
              "threads": first["machine"]["threads"], "batch": args.batch, "rounds": args.rounds,
              "parts": args.parts, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "auto_isa.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "auto_isa.md").write_text(markdown(result) + "\n")
    sys.stdout.write(markdown(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
