"""Does the shipped model hold on another CPU? VGG-16 / CIFAR-10 per instruction set, as users run it.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. ``backend="auto"`` chooses per
layer by measurement, and the ``fused`` kernels have an AVX-512 and an AVX2 build; ratios moved
between an AVX-512 and an AVX2 machine before. This benchmark runs, in a fresh process per
instruction set -- the machine's own, and capped at AVX2 with ``ONEDNN_MAX_CPU_ISA=AVX2``,
``MKL_ENABLE_INSTRUCTIONS=AVX2`` and ``SPARSE_HETCONV_MAX_ISA=avx2`` (oneDNN, MKL and the fused
kernels then run their AVX2 code; cache sizes and core counts stay this machine's) -- two things:

1. **Channels-last, batch ``--batch``**, interleaved: ``published`` (gwc + pwc, NCHW, gradient
   masking: the paper's code), ``masked_cl`` (the masked form, channels-last), ``sparse_model``
   (the sparse model with the backends the cost model alone picks) and ``sparse_confirm`` (the
   default ``"confirm"`` mode: proposals kept only where a timing on this machine confirms them).
   Each sparse variant's backends are resolved once per mode and pinned, so the timings compare
   the choices, not the cost of choosing. A training step (forward, cross-entropy, backward, SGD
   with momentum), an eval forward (``no_grad``) and one of each in turn.
2. **As a user runs it** (``--user-batch``, default 16): NCHW input straight from a loader, the model
   switched ``train()`` / ``eval()`` every step, ``auto`` unpinned (as ``to_sparse`` ships it):
   each round times one training step right after an evaluation and one evaluation right after a
   training step, for ``published`` and the shipped sparse model, interleaved.

Reported per P: medians over interleaved rounds and the median of per-round ratios.

Run: ``MALLOC_MMAP_THRESHOLD_=33554432 python -m benchmarks.auto_isa [--parts 4 8 64] [--rounds 9]``
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

ISAS = {"native": {},
        "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "SPARSE_HETCONV_MAX_ISA": "avx2"}}
VARIANTS = ("published", "masked_cl", "sparse_model", "sparse_confirm")
USER_VARIANTS = ("published", "shipped")


def _ratios(stats: dict, name: str, base: str) -> dict:
    ratios = [a / b for a, b in zip(stats[name]["times_ms"], stats[base]["times_ms"])]
    quart = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"ratio": statistics.median(ratios), "q1_ratio": quart[0], "q3_ratio": quart[2]}


def child(args) -> dict:
    import torch

    from sparse_hetconv import autotune, to_sparse
    from sparse_hetconv.backends import fused
    from sparse_hetconv.models import vgg16_cifar
    from sparse_hetconv.profiling import interleaved_latency

    from .harness.machine import machine_info, pin_mmap_threshold
    from .harness.published import mask_gradients, published_from_masked

    pin_mmap_threshold()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (args.batch,))
    rows, picks = [], {}
    for part in args.parts:
        masked = vgg16_cifar(part=part, form="masked").eval()
        published = published_from_masked(masked)._apply(lambda t: t.contiguous()).eval()  # the paper's NCHW code
        models = {"published": published, "masked_cl": masked}
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
        inputs = {name: x.contiguous() if name == "published" else x for name in models}

        def pin(name: str, training: bool) -> None:
            if name.startswith("sparse_"):
                for layer, backend in pins[name.removeprefix("sparse_")][training].items():
                    models[name].get_submodule(layer).backend = backend

        def train(name: str):
            def run():
                pin(name, True)
                model = models[name].train()
                optimizers[name].zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(inputs[name]), target).backward()
                if name == "published":
                    mask_gradients(model)
                optimizers[name].step()
            return run

        def evaluate(name: str):
            def run():
                pin(name, False)
                model = models[name].eval()
                with torch.no_grad():
                    model(inputs[name])
            return run

        def loop(name: str):
            step, forward = train(name), evaluate(name)
            return lambda: (step(), forward())

        for what, make in (("train", train), ("eval", evaluate), ("train_then_eval", loop)):
            stats = interleaved_latency({name: make(name) for name in VARIANTS}, warmup=2, repeats=args.rounds)
            for name in VARIANTS:
                ratio = _ratios(stats, name, "masked_cl")
                rows.append({"part": part, "what": what, "variant": name, "median_ms": stats[name]["median_ms"],
                             "vs_masked": ratio["ratio"], "q1_ratio": ratio["q1_ratio"], "q3_ratio": ratio["q3_ratio"]})
        rows += user_rows(part, masked, args, torch, to_sparse, published_from_masked, mask_gradients,
                          interleaved_latency)
        if _has_bf16() and not os.environ.get("ONEDNN_MAX_CPU_ISA"):
            rows += bf16_rows(part, masked, x, target, args, torch, to_sparse, interleaved_latency)
    return {"machine": machine_info(), "isa_cap": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "fused_isa": fused.lanes() and ("avx512" if fused.lanes() == 16 else "avx2"), "rows": rows, "picks": picks}


def _has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def bf16_rows(part, masked, x, target, args, torch, to_sparse, interleaved_latency):
    """bfloat16 where the CPU has AMX or AVX-512-BF16: eval of a bfloat16 model and a training
    step under CPU autocast, masked_cl against the shipped sparse model (auto unpinned)."""
    from sparse_hetconv import autotune

    autotune.clear()
    models = {"masked_cl": masked, "shipped": to_sparse(masked)}
    low = {name: __import__("copy").deepcopy(m).to(torch.bfloat16).eval() for name, m in models.items()}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for name, m in models.items()}
    xb = x.to(torch.bfloat16)

    def evaluate(name):
        def run():
            with torch.no_grad():
                low[name](xb)
        return run

    def train(name):
        def run():
            model = models[name].train()
            optimizers[name].zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            optimizers[name].step()
        return run

    rows = []
    for what, make in (("bf16_eval", evaluate), ("autocast_train", train)):
        stats = interleaved_latency({name: make(name) for name in models}, warmup=2, repeats=args.rounds)
        for name in models:
            ratio = _ratios(stats, name, "masked_cl")
            rows.append({"part": part, "what": what, "variant": name, "median_ms": stats[name]["median_ms"],
                         "vs_masked": ratio["ratio"]})
    return rows


def user_rows(part, masked, args, torch, to_sparse, published_from_masked, mask_gradients, interleaved_latency):
    """Part 2 of the module docstring: NCHW input, train() / eval() every step, auto unpinned."""
    from sparse_hetconv import autotune

    autotune.clear()
    x = torch.randn(args.user_batch, 3, 32, 32)  # NCHW, as a DataLoader yields it
    target = torch.randint(0, 10, (args.user_batch,))
    models = {"published": published_from_masked(masked)._apply(lambda t: t.contiguous()), "shipped": to_sparse(masked)}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for name, m in models.items()}
    times = {name: {"train": [], "eval": []} for name in models}

    def step(name: str):
        model, optimizer = models[name], optimizers[name]

        def run():
            model.train()
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), target).backward()
            if name == "published":
                mask_gradients(model)
            optimizer.step()
            middle = time.perf_counter()
            model.eval()
            with torch.no_grad():
                model(x)
            end = time.perf_counter()
            times[name]["train"].append((middle - start) * 1e3)
            times[name]["eval"].append((end - middle) * 1e3)
        return run

    interleaved_latency({name: step(name) for name in models}, warmup=2, repeats=args.rounds)
    rows = []
    for what in ("train", "eval"):
        runs = {name: times[name][what][-args.rounds:] for name in models}
        speedups = [p / s for p, s in zip(runs["published"], runs["shipped"])]
        for name in models:
            rows.append({"part": part, "what": f"user_{what}", "variant": name,
                         "median_ms": statistics.median(runs[name]),
                         "speedup_over_published": statistics.median(speedups) if name == "shipped" else 1.0})
    return rows


def markdown(result: dict) -> str:
    lines = ["# The shipped model on two instruction sets: VGG-16 / CIFAR-10", "",
             f"Command: `{result['command']}` ({result['seconds'] / 60:.1f} min). CPU: {result['cpu']}; "
             f"{result['threads']} threads, float32; {result['rounds']} interleaved rounds, medians; ratio = median "
             "of per-round ratios.", ""]
    for isa, run in result["runs"].items():
        cap = run["isa_cap"] or "none"
        table = {(r["part"], r["what"], r["variant"]): r for r in run["rows"]}
        lines += [f"## {isa}: oneDNN / MKL ISA cap {cap}, fused kernels {run.get('fused_isa') or 'unavailable'} "
                  f"(the CPU itself: {run['machine']['isa']})", "",
                  f"Channels-last input, batch {result['batch']}; ratio to `masked_cl` (lower is faster):", "",
                  "| P | step | published ms (ratio) | masked_cl ms | sparse_model ms (ratio) | sparse_confirm ms (ratio) |",
                  "|---:|---|---:|---:|---:|---:|"]
        for part in result["parts"]:
            for what in ("train", "eval", "train_then_eval"):
                cells = []
                for name in VARIANTS:
                    row = table[(part, what, name)]
                    cells.append(f"{row['median_ms']:.1f}" + ("" if name == "masked_cl" else f" ({row['vs_masked']:.3f})"))
                lines.append(f"| {part} | {what} | " + " | ".join(cells) + " |")
        lines += ["", f"As a user runs it: NCHW input, batch {result['user_batch']}, `train()` / `eval()` every step, "
                  "`auto` unpinned; speed-up of the shipped model over the published code (higher is faster):", "",
                  "| P | step | published ms | shipped ms | speed-up |", "|---:|---|---:|---:|---:|"]
        for part in result["parts"]:
            for what in ("user_train", "user_eval"):
                pub, ship = table[(part, what, "published")], table[(part, what, "shipped")]
                lines.append(f"| {part} | {what.removeprefix('user_')} | {pub['median_ms']:.1f} | {ship['median_ms']:.1f} | "
                             f"{ship['speedup_over_published']:.2f}x |")
        if any(r["what"] == "bf16_eval" for r in run["rows"]):
            lines += ["", f"bfloat16 (the CPU has {'AMX' if 'amx' in run['machine']['isa'].lower() else 'AVX-512-BF16'}): "
                      "a bfloat16 model's eval and a training step under CPU autocast; ratio to `masked_cl`:", "",
                      "| P | step | masked_cl ms | shipped ms (ratio) |", "|---:|---|---:|---:|"]
            for part in result["parts"]:
                for what in ("bf16_eval", "autocast_train"):
                    m, ship = table.get((part, what, "masked_cl")), table.get((part, what, "shipped"))
                    if m and ship:
                        lines.append(f"| {part} | {what} | {m['median_ms']:.1f} | {ship['median_ms']:.1f} "
                                     f"({ship['vs_masked']:.3f}) |")
        lines += ["", "Backends picked (training / inference):", ""]
        for part, by_mode in run["picks"].items():
            text = "; ".join(f"{mode}: {', '.join(p['train'])} / {', '.join(p['eval'])}" for mode, p in by_mode.items())
            lines.append(f"* P={part}: {text}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.auto_isa", description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", type=int, nargs="+", default=[4, 8, 64])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--user-batch", type=int, default=16)
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
        command = [sys.executable, "-m", "benchmarks.auto_isa", "--child", "--batch", str(args.batch), "--user-batch",
                   str(args.user_batch), "--rounds", str(args.rounds), "--parts", *map(str, args.parts)] + (["--threads", str(args.threads)] if args.threads else [])
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
              "threads": first["machine"]["threads"], "batch": args.batch, "user_batch": args.user_batch,
              "rounds": args.rounds,
              "parts": args.parts, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "auto_isa.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "auto_isa.md").write_text(markdown(result) + "\n")
    sys.stdout.write(markdown(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
