"""HetConv latency and memory benchmark: VGG-16 / CIFAR-10, every layer shape and the network.

Run by ``python -m benchmarks.bench`` (``make bench``); ``--quick`` for a short run. For each part
P, each timing *set* (one level — a layer shape or the whole network —, one P, one mode) builds
every variant of :mod:`.variants` from the same weights, checks that their outputs agree, warms
them up and times them in interleaved rounds (medians). Modes: ``forward_b1`` and
``forward_b<batch>`` (eval, ``no_grad``) and ``train_b<batch>`` (forward, loss, backward, SGD
step; the published form masks its gradients after backward). Then peak training memory of each
network variant in a fresh process, training-state bytes, and a ``torch.profiler`` table of the
shipped model. ``bench.json`` in ``--out`` is rewritten (atomically) after every set and memory
measurement, so a stopped run keeps what it measured (``"finished": false``); ``bench.md``,
``layers.md``, ``profiles.md`` and the plots follow at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sparse_hetconv import profiling
from sparse_hetconv._files import atomic_write, check_output_folder
from sparse_hetconv.counting import count_macs, count_params
from sparse_hetconv.models import vgg16_cifar
from sparse_hetconv.pattern import HetConvPattern

from .machine import gemm_gflops, machine_info, pin_mmap_threshold
from . import report
from . import variants as V

PARTS = (1, 2, 4, 8, 16, 32, 64)
# --quick: what answers "is the shipped form faster than the published one and the standard
# convolution?" at the paper's P = 4, in the time options.QUICK_BENCH states (measured).
QUICK_PARTS = (4,)
QUICK_SHAPES = ((64, 64, 32), (512, 512, 2))
QUICK_VARIANTS = ("standard_cl", "published", "masked_cl", "sparse_auto_cl")
QUICK_REPEATS = 2
REPO = Path(__file__).resolve().parents[2]  # the memory subprocesses import benchmarks.harness from here
MEMORY_VARIANTS = ("standard_nchw", "standard_cl", "published", "masked_nchw", "masked_cl", "sparse_auto_nchw",
                   "sparse_auto_cl")
COMPILE_PARTS = (2, 4)  # torch.compile costs ~12 s per model and batch size: only where the ideal target is
SLOW_FACTOR = 25.0  # a variant whose warm-up call is this much slower than the set's fastest is skipped
SLOW_FLOOR_MS = 50.0


def _useful_macs_network(part: int) -> int:
    return count_macs(vgg16_cifar(part=part, memory_format=None), (1, 3, 32, 32), norm=False)


def _useful_macs_layer(shape, part: int) -> int:
    in_channels, out_channels, size = shape
    return HetConvPattern(in_channels, out_channels, part).useful_macs_per_pixel() * size * size


def _inputs(level: str, shape, batch: int, mode: str, seed: int):
    generator = torch.Generator().manual_seed(seed)
    if level == "network":
        x = torch.randn(batch, 3, 32, 32, generator=generator)
        target = torch.randint(0, 10, (batch,), generator=generator)
    else:
        in_channels, out_channels, size = shape
        x = torch.randn(batch, in_channels, size, size, generator=generator)
        target = torch.randn(batch, out_channels, size, size, generator=generator)
    return x, target


def _check_outputs(cases: dict, x: torch.Tensor) -> dict[str, float]:
    """Largest |output - published output| relative to the published output's scale."""
    outs = {}
    for name, case in cases.items():
        if name.startswith("standard") or name in V.COMPILED:  # compiling for batch 2 too costs ~15 s
            continue
        case.module.eval()
        outs[name] = case.forward_fn(x[:2])().float()
    if "published" not in outs:
        return {}
    ref = outs["published"]
    scale = float(ref.abs().max().clamp(min=1e-12))
    diffs = {name: float((out - ref).abs().max()) / scale for name, out in outs.items()}
    bad = {name: d for name, d in diffs.items() if not d < 1e-3}
    if bad:
        raise RuntimeError(f"variants disagree with the published form (relative error): {bad}")
    return diffs


def _time_set(cases: dict, mode: str, x, target, warmup: int, repeats: int, bar) -> tuple[dict, dict]:
    """Warm up, drop pathological variants, then time in interleaved rounds."""
    fns, skipped = {}, {}
    for name, case in cases.items():
        if mode.startswith("train") and name in V.INFERENCE_ONLY:
            continue
        case.module.train(mode.startswith("train"))
        fns[name] = case.train_fn(x, target) if mode.startswith("train") else case.forward_fn(x)
    for name in fns:
        if name in V.COMPILED:
            for _ in range(2):
                fns[name]()  # compile for this batch size before anything is timed
        elif "_auto_" in name:
            fns[name]()  # backend="auto" times its candidates on a signature's first call (once, as compiling)
    first = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        first[name] = (time.perf_counter() - start) * 1e3
    fastest = min(first.values())
    for name, ms in first.items():
        if ms > max(SLOW_FACTOR * fastest, SLOW_FLOOR_MS):
            skipped[name] = f"skipped: first call {ms:.0f} ms, > {SLOW_FACTOR:.0f}x the fastest variant's {fastest:.1f} ms"
    fns = {name: fn for name, fn in fns.items() if name not in skipped}
    stats = profiling.interleaved_latency(fns, warmup=max(warmup - 1, 0), repeats=repeats, progress=bar.update)
    return stats, skipped


def run_set(level: str, shape, part: int, names, args, bar, rows: list, checks: list) -> None:
    names = [n for n in names if n not in V.COMPILED or part in COMPILE_PARTS]
    cases = V.network_cases(part, names) if level == "network" else V.layer_cases(shape, part, names)
    label = "vgg16_cifar" if level == "network" else "{}->{} @{}x{}".format(shape[0], shape[1], shape[2], shape[2])
    x_check, _ = _inputs(level, shape, 2, "forward", 1)
    checks.append({"level": level, "shape": label, "part": part, "rel_error": _check_outputs(cases, x_check)})
    useful = _useful_macs_network(part) if level == "network" else _useful_macs_layer(shape, part)
    standard_macs = _useful_macs_network(1) if level == "network" else _useful_macs_layer(shape, 1)
    for mode, batch in (("forward_b1", 1), (f"forward_b{args.batch}", args.batch), (f"train_b{args.batch}", args.batch)):
        bar.set_description(f"{level} {label} P={part} {mode}")
        x, target = _inputs(level, shape, batch, mode, 0)
        stats, skipped = _time_set(cases, mode, x, target, args.warmup, args.repeats, bar)
        for name, s in stats.items():
            rows.append({"level": level, "shape": label, "part": part, "mode": mode, "batch": batch, "variant": name,
                         "backend": V.backend_of(cases[name]), "useful_macs": useful * batch,
                         "standard_macs": standard_macs * batch, **s})
        for name, why in skipped.items():
            rows.append({"level": level, "shape": label, "part": part, "mode": mode, "batch": batch, "variant": name,
                         "skipped": why})
    del cases


def add_ratios(rows: list) -> None:
    """Ratios to the published form, to the standard convolution and to the FLOP-ideal time."""
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        groups.setdefault((row["level"], row["shape"], row["part"], row["mode"]), {})[row["variant"]] = row
    standard_cl = {}
    for (level, shape, part, mode), group in groups.items():
        if "standard_cl" in group and "median_ms" in group["standard_cl"]:
            standard_cl.setdefault((level, shape, mode), []).append(group["standard_cl"]["median_ms"])
    for (level, shape, part, mode), group in groups.items():
        published = group.get("published", {}).get("median_ms")
        standard = group.get("standard_nchw", {}).get("median_ms")
        ref = standard_cl.get((level, shape, mode))
        for row in group.values():
            if "median_ms" not in row:
                continue
            ms = row["median_ms"]
            work = row["useful_macs"] * (3 if mode.startswith("train") else 1)  # backward ~ 2x forward
            row["gflops"] = 2 * work / (ms * 1e-3) / 1e9
            row["vs_published"] = published / ms if published else None
            row["vs_standard"] = standard / ms if standard else None
            if ref:  # the P=1 convolution in channels-last, scaled by the useful-MAC ratio
                row["ideal_ms"] = statistics.median(ref) * row["useful_macs"] / row["standard_macs"]
                row["over_ideal"] = ms / row["ideal_ms"]


def run_memory(parts, variants, args, bar, results: list, save) -> None:
    """Peak training memory of each network variant in a fresh process; ``save()`` after each."""
    for part in parts:
        expected = count_params(vgg16_cifar(part=part, memory_format=None)) * 4  # float32, existing kernels
        for name in variants:
            if part == 1 and not name.startswith("standard") and name != "published":
                continue
            bar.set_description(f"memory P={part} {name}")
            try:
                got = profiling.peak_training_memory("benchmarks.harness.variants:memory_case",
                                                     {"variant": name, "part": part, "batch": args.batch}, steps=2,
                                                     threads=args.threads, path=[str(REPO)])
                results.append({"part": part, "variant": name, "expected_param_bytes": expected, **got})
            except RuntimeError as error:
                results.append({"part": part, "variant": name, "error": str(error)[-500:]})
            bar.update(1)
            save()


def run_profiles(parts, args) -> list:
    """torch.profiler tables of the shipped model and the masked form (network, batch ``--batch``)."""
    from torch.profiler import ProfilerActivity, profile

    tables = []
    for part in parts:
        cases = V.network_cases(part, ["masked_cl", "sparse_auto_cl"])
        for mode in ("forward", "train"):
            x, target = _inputs("network", None, args.batch, mode, 0)
            for name, case in cases.items():
                case.module.train(mode == "train")
                fn = case.train_fn(x, target) if mode == "train" else case.forward_fn(x)
                for _ in range(2):
                    fn()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(3):
                        fn()
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=42)
                tables.append({"part": part, "mode": f"{mode}_b{args.batch}", "variant": name, "calls": 3,
                               "table": table})
    return tables


def execute(args: argparse.Namespace) -> tuple[dict, list[Path]]:
    """Run the benchmark the parsed ``args`` describe, rewriting ``bench.json`` in ``args.out`` as
    results come in; write the reports at the end. Returns the result and the paths written
    (``bench.json`` first)."""
    parts = tuple(args.parts or (QUICK_PARTS if args.quick else PARTS))
    for part in parts:  # before any work: every VGG-16 layer (64 to 512 channels) must take it
        if part not in PARTS:
            raise ValueError(f"parts holds {part}, expected divisors of VGG-16's 64 channels: {list(PARTS)}")
    names = tuple(args.variants or (QUICK_VARIANTS if args.quick else V.ALL))
    unknown = sorted(set(names) - set(V.ALL))
    if unknown:
        raise ValueError(f"variants {unknown} are not known; choose from {V.ALL}")
    if args.no_compile or args.quick:
        names = tuple(n for n in names if n not in V.COMPILED)
    check_output_folder(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    pinned = pin_mmap_threshold()
    torch.set_flush_denormal(True)
    args.repeats = args.repeats or (QUICK_REPEATS if args.quick else 11)
    shapes = QUICK_SHAPES if args.quick else V.LAYER_SHAPES
    shapes = shapes[:args.shapes] if args.shapes else shapes
    memory_parts = () if args.no_memory else ((4,) if args.quick else parts)
    memory_variants = [n for n in MEMORY_VARIANTS if n in names]
    profile_parts = () if args.no_profile or args.quick else tuple(p for p in (2, 4) if p in parts)
    sets = [("network", None, p) for p in parts if "network" in args.levels]
    sets += [("layer", s, p) for p in parts for s in shapes if "layer" in args.levels]
    total = len(sets) * 3 * len(names) * args.repeats + len(memory_parts) * len(memory_variants)
    info = machine_info()
    info["mallopt_pinned"] = pinned
    info["gemm_gflops"] = gemm_gflops(1024 if args.quick else 2048)  # the practical peak the GFLOP/s are read against
    info["sgemm_gflops"] = max(info["gemm_gflops"].values())
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    result = {"command": " ".join(["python -m benchmarks.bench"] + sys.argv[1:]), "machine": info,
              "config": {"parts": parts, "batch": args.batch, "repeats": args.repeats, "warmup": args.warmup,
                         "threads": args.threads, "quick": args.quick, "variants": names,
                         "shapes": [list(s) for s in shapes], "levels": args.levels},
              "finished": False, "seconds": 0.0, "rows": [], "checks": [], "memory": [], "profiles": []}

    def save() -> None:  # atomically: a run stopped at any moment leaves the last complete state
        result["seconds"] = time.time() - start
        add_ratios(result["rows"])
        text = json.dumps(result, separators=(",", ":")) + "\n"
        atomic_write(args.out / "bench.json", lambda file: file.write(text.encode()))

    save()
    with tqdm(total=total, unit="call", dynamic_ncols=True, file=sys.stderr, mininterval=5) as bar:
        for index, (level, shape, part) in enumerate(sets):
            run_set(level, shape, part, names, args, bar, result["rows"], result["checks"])
            save()
            # not every variant exists in every set: re-estimate what is left
            bar.total = (bar.n + (len(sets) - index - 1) * 3 * len(names) * args.repeats
                         + len(memory_parts) * len(memory_variants))
            bar.refresh()
        run_memory(memory_parts, memory_variants, args, bar, result["memory"], save)
    result["profiles"] = run_profiles(profile_parts, args) if profile_parts else []
    result["finished"] = True
    save()
    return result, [args.out / "bench.json", *report.write_all(result, args.out)]


def summary(result: dict, written: list[Path]) -> str:
    """One line for the command line: what was written, how long it took, on how many threads."""
    return (f"wrote {', '.join(str(p) for p in written)} in {result['seconds']:.0f} s "
            f"({result['config']['threads']} threads, mmap threshold pinned: "
            f"{result['machine']['mmap_threshold_pinned']})")
