"""SubMHetConv3d against spconv's SubMConv3d on a synthetic voxelised scene.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. The scene is points on a
sphere and on a plane voxelised into a 64^3 grid (about 4 % of the voxels active, batch 1). Every
layer maps ``--channels`` to ``--channels`` channels with a 3x3x3 kernel, no bias:

* spconv's ``SubMConv3d`` (a standard k^3 convolution, the baseline);
* :class:`sparse_hetconv.submanifold.SubMHetConv3d` at P = 1, 2, 4, 8 with the default ``chunks``;
* a sweep over every ``chunks`` (divisors of P), the measurement behind ``default_chunks``.

Correctness first: every HetConv layer is compared with its dense twin (SparseHetConv3d on the
zero-filled grid) at the active sites of a small float64 scene, and at P = 1 with spconv's own
layer carrying the same weights on the benchmark scene; the run stops if any differs.

Timing: forward (``no_grad``, eval) and training step (forward, backward to the weights and the
input features, SGD step), each layer once per round in turn (interleaved), after warm-up rounds;
medians over rounds and the median of the per-round ratios to spconv. Two settings: index pairs
computed by every call (no ``indice_key``), and shared through an ``indice_key`` as in a network of
submanifold layers. The machine, threads and command are written beside the numbers.

Run: ``MALLOC_MMAP_THRESHOLD_=33554432 python -m benchmarks.bench_spconv [--threads 1] [--rounds 15]``
(writes ``benchmarks/results/spconv.json`` and ``.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from importlib import metadata
from pathlib import Path

import torch

from sparse_hetconv.profiling import interleaved_latency, parameter_bytes
from sparse_hetconv.submanifold import SubMHetConv3d, default_chunks  # a clear ImportError without spconv

from . import RESULTS
from .harness.machine import machine_info

import spconv.pytorch as spconv_pt  # noqa: E402  (after the check above)
from spconv.core import ConvAlgo  # noqa: E402
PARTS = (1, 2, 4, 8)
KEY = "bench"


def voxel_scene(size: int = 64, seed: int = 0) -> torch.Tensor:
    """Indices (int32, ``(sites, 4)``: batch 0, z, y, x) of a sphere and a plane voxelised in a ``size^3`` grid."""
    g = torch.Generator().manual_seed(seed)
    radius, centre = 0.35 * size, torch.full((3,), size / 2)
    directions = torch.randn(int(12 * math.pi * radius**2), 3, generator=g)
    sphere = centre + radius * directions / directions.norm(dim=1, keepdim=True)
    uv = torch.rand(3 * size * size, 2, generator=g) * (size - 1)
    plane = torch.cat([torch.full((uv.shape[0], 1), 0.1 * size), uv], dim=1)
    voxels = torch.cat([sphere, plane]).round().long().clamp(0, size - 1)
    linear = torch.unique((voxels[:, 0] * size + voxels[:, 1]) * size + voxels[:, 2])
    coords = torch.stack([linear // (size * size), linear // size % size, linear % size], dim=1)
    return torch.cat([torch.zeros_like(linear)[:, None], coords], dim=1).int().contiguous()


def at_sites(dense: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return dense.movedim(1, -1)[tuple(indices.long().t())]


def check_correctness(channels: int, indices: torch.Tensor) -> dict:
    """Largest differences: HetConv vs its dense twin (float64, 16^3 scene), P = 1 vs spconv (float32)."""
    small = voxel_scene(16, seed=1)
    feats = torch.randn(small.shape[0], channels, dtype=torch.float64)
    x = spconv_pt.SparseConvTensor(feats, small, [16] * 3, 1)
    grid = torch.zeros((1, 16, 16, 16, channels), dtype=torch.float64).index_put(tuple(small.long().t()), feats)
    grid = grid.movedim(-1, 1)
    worst = 0.0
    with torch.no_grad():
        for part in PARTS:
            for chunks in [q for q in range(1, part + 1) if part % q == 0]:
                layer = SubMHetConv3d(channels, channels, part, chunks=chunks, dtype=torch.float64)
                diff = (layer(x).features - at_sites(layer.to_dense()(grid), small)).abs().max().item()
                worst = max(worst, diff)
        theirs = spconv_pt.SubMConv3d(channels, channels, 3, bias=False, algo=ConvAlgo.Native)
        ours = SubMHetConv3d(channels, channels, 1)
        ours.weight_kxk.copy_(theirs.weight.permute(0, 4, 1, 2, 3))  # spconv (out, k, k, k, in) -> PyTorch's
        big = spconv_pt.SparseConvTensor(torch.randn(indices.shape[0], channels), indices, [64] * 3, 1)
        vs_spconv = (ours(big).features - theirs(big).features).abs().max().item()
    if worst > 1e-9 or vs_spconv > 1e-4:
        raise RuntimeError(f"results differ: vs dense twin {worst:.3g} (float64), vs spconv {vs_spconv:.3g} (float32)")
    return {"max_abs_diff_vs_dense_float64": worst, "max_abs_diff_p1_vs_spconv_float32": vs_spconv}


def build_cases(channels: int) -> dict:
    """name -> (module, row info). Default chunks for every P, then the other chunks of the sweep."""
    torch.manual_seed(0)
    cases = {"spconv": (spconv_pt.SubMConv3d(channels, channels, 3, bias=False, indice_key=KEY, algo=ConvAlgo.Native),
                        {"layer": "spconv SubMConv3d", "part": 1, "chunks": None, "sweep": False})}
    sweep = {}
    for part in PARTS:
        auto = SubMHetConv3d(channels, channels, part, indice_key=KEY)
        default = default_chunks(auto.pattern)
        cases[f"P{part}"] = (auto, {"layer": "SubMHetConv3d", "part": part, "chunks": default, "sweep": False})
        for chunks in [q for q in range(1, part + 1) if part % q == 0 and q != default]:
            sweep[f"P{part}Q{chunks}"] = (SubMHetConv3d(channels, channels, part, indice_key=KEY, chunks=chunks),
                                          {"layer": "SubMHetConv3d", "part": part, "chunks": chunks, "sweep": True})
    for case in (cases | sweep).values():
        module, info = case
        params = sum(p.numel() for p in module.parameters())
        info.update(params=params, param_bytes=parameter_bytes(module))
    return cases, sweep


def time_rounds(cases: dict, indices: torch.Tensor, channels: int, shared: bool, rounds: int, warmup: int) -> dict:
    """Interleaved timings (:func:`sparse_hetconv.profiling.interleaved_latency`): per case the
    forward and training-step milliseconds of every round."""
    features = torch.randn(indices.shape[0], channels)
    base = spconv_pt.SparseConvTensor(features, indices, [64] * 3, 1)
    if shared:  # index pairs made once, under the key every layer uses
        base = spconv_pt.SubMConv3d(channels, channels, 3, indice_key=KEY, algo=ConvAlgo.Native)(base)
        base = base.replace_feature(features)
    else:
        base.indice_dict = {}
    calls = {}
    for name, (module, _) in cases.items():
        module.indice_key = KEY if shared else None
        optimiser = torch.optim.SGD(module.parameters(), lr=1e-4)

        def forward(module=module):
            module.eval()
            with torch.no_grad():
                module(base)

        def train(module=module, optimiser=optimiser):
            module.train()
            x = base.replace_feature(features.clone().requires_grad_(True))
            optimiser.zero_grad()
            module(x).features.square().mean().backward()
            optimiser.step()

        calls[(name, "forward_ms")], calls[(name, "train_ms")] = forward, train
    stats = interleaved_latency(calls, warmup=warmup, repeats=rounds)
    return {name: {what: stats[(name, what)]["times_ms"] for what in ("forward_ms", "train_ms")} for name in cases}


def summarise(times: dict, baseline: str = "spconv") -> dict:
    out = {}
    for name, t in times.items():
        row = {}
        for what in ("forward_ms", "train_ms"):
            ratios = [a / b for a, b in zip(t[what], times[baseline][what])]
            row[what] = statistics.median(t[what])
            row[what.replace("_ms", "_ratio")] = statistics.median(ratios)
        out[name] = row
    return out


def machine(threads: int) -> dict:
    info = machine_info()
    versions = {}
    for dist in ("torch", "spconv-cu120", "spconv-cu126", "spconv", "cumm-cu120", "cumm-cu126"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {"platform": info["platform"], "cpu": info["cpu"], "isa": info["isa"], "cpu_count": info["cores"],
            "threads": threads, "python": info["python"], "versions": versions,
            "MALLOC_MMAP_THRESHOLD_": info["mmap_threshold_env"], "device": "cpu"}


def markdown(result: dict) -> str:
    m, s = result["machine"], result["scene"]
    lines = [
        "# SubMHetConv3d vs spconv SubMConv3d (3x3x3, CPU)",
        "",
        f"Scene: sphere + plane voxelised in a {s['size']}^3 grid, {s['sites']:,} active sites "
        f"({s['occupancy']:.1%}), batch 1, float32. Machine: {m['cpu']} ({m.get('isa', 'ISA unknown')}, {m['cpu_count']} cores, shared with "
        f"other jobs), {m['threads']} thread(s), torch {m['versions'].get('torch')}, "
        f"spconv {m['versions'].get('spconv-cu120') or m['versions'].get('spconv-cu126')} (ConvAlgo.Native). "
        f"Load average before / after: {result['load_before']} / {result['load_after']}.",
        f"Command: `{result['command']}`; {result['rounds']} interleaved rounds after {result['warmup']} warm-up "
        "rounds; medians, and the median of the per-round ratios to spconv (x spconv, lower is faster). "
        "Training step: forward, backward to the weights and the input features, SGD step.",
        "",
    ]
    for run in result["runs"]:
        c = run["channels"]
        for setting, title in (("shared", "index pairs shared through an indice_key, as in a network"),
                               ("fresh", "index pairs computed by every call")):
            lines += [f"## {c} -> {c} channels, {title}", "",
                      "| layer | P | chunks | parameters | parameter bytes | forward ms | x spconv "
                      "| training step ms | x spconv |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for name, row in run["timings"][setting].items():
                info = run["cases"][name]
                if info["sweep"]:
                    continue
                lines.append(f"| {info['layer']} | {info['part']} | {info['chunks'] or '-'} | {info['params']:,} | "
                             f"{info['param_bytes']:,} | {row['forward_ms']:.1f} | {row['forward_ratio']:.2f} | "
                             f"{row['train_ms']:.1f} | {row['train_ratio']:.2f} |")
            lines.append("")
        lines += [f"## {c} -> {c} channels, every chunks (index pairs shared; * = default_chunks)", "",
                  "| P | chunks | channels per chunk | forward ms | x spconv | training step ms | x spconv |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        shared = run["timings"]["shared"]
        names = [n for n in shared if run["cases"][n]["chunks"]]
        for name in sorted(names, key=lambda n: (run["cases"][n]["part"], run["cases"][n]["chunks"])):
            info, row = run["cases"][name], shared[name]
            mark = "" if info["sweep"] else "*"
            lines.append(f"| {info['part']} | {info['chunks']}{mark} | {c // info['chunks']} | "
                         f"{row['forward_ms']:.1f} | {row['forward_ratio']:.2f} | {row['train_ms']:.1f} | "
                         f"{row['train_ratio']:.2f} |")
        check = run["correctness"]
        lines += ["", f"Correctness ({c} channels): max |SubMHetConv3d - dense twin| at the active sites "
                  f"{check['max_abs_diff_vs_dense_float64']:.1e} (float64, every P and chunks); "
                  f"max |P=1 - spconv SubMConv3d| {check['max_abs_diff_p1_vs_spconv_float32']:.1e} "
                  "(float32, same weights).", ""]
    return "\n".join(lines)


def run_channels(channels: int, indices: torch.Tensor, rounds: int, warmup: int) -> dict:
    correctness = check_correctness(channels, indices)
    cases, sweep = build_cases(channels)
    timings = {
        "shared": summarise(time_rounds(cases | sweep, indices, channels, True, rounds, warmup)),
        "fresh": summarise(time_rounds(cases, indices, channels, False, rounds, warmup)),
    }
    return {"channels": channels, "correctness": correctness,
            "cases": {name: info for name, (_, info) in (cases | sweep).items()}, "timings": timings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = [round(v, 2) for v in os.getloadavg()]
    indices = voxel_scene(64)
    runs = [run_channels(c, indices, args.rounds, args.warmup) for c in args.channels]
    result = {
        "command": " ".join(["python", "-m", "benchmarks.bench_spconv", *(sys.argv[1:] if argv is None else argv)]),
        "rounds": args.rounds, "warmup": args.warmup,
        "scene": {"size": 64, "sites": indices.shape[0], "occupancy": indices.shape[0] / 64**3},
        "machine": machine(args.threads), "load_before": load_before,
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "spconv.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "spconv.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
