"""What conversion by probing costs: ``to_sparse(layer, probe=...)`` on one M -> M, 3 x 3 layer.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. Probing reads a layer from its
responses to one batch of ``M * stride**2`` impulses of ``(k + stride - 1)**2`` pixels, so its cost
is about one forward of the layer on that batch (in float32 on the CPU for a float32 layer, float64
otherwise) plus the checks. Two ways of computing a HetConv are timed, each checked first against
the converted layer: a dense ``nn.Conv2d`` under the paper's shifted mask (``to_shifted`` of a
random sparse layer: the most expensive forward) and the published ``gwc`` + ``pwc`` pair
(``MaskedHetConv2d``, probed here instead of read by its layout).

Run: ``python -m benchmarks.probe_cost [--channels 512] [--repeats 5] [--threads N]`` (writes
``benchmarks/results/probe_cost_<N>threads.json`` and ``.md``): per layer the fastest and the median wall time
of the repeats after one warm-up, and the fastest CPU time of the process. On a machine shared with
other work, one thread's CPU time is the figure that the others' load does not inflate.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

from sparse_hetconv import MaskedHetConv2d, SparseHetConv2d, to_shifted, to_sparse

from . import RESULTS


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _layers(channels: int, part: int, stride: int, dtype: torch.dtype) -> dict[str, tuple[nn.Module, object]]:
    """name -> (layer, ``probe``); the last is read by its layout, for comparison."""
    torch.manual_seed(0)
    sparse = SparseHetConv2d(channels, channels, part, 3, stride, bias=True).to(dtype).eval()
    masked = sparse.to_masked().eval()
    return {"dense conv x shifted mask": (to_shifted(sparse, memory_format=None).eval(), ["layer"]),
            "gwc + pwc (MaskedHetConv2d)": (masked, [MaskedHetConv2d]), "gwc + pwc, by its layout": (masked, None)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.probe_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for dtype in (torch.float32, torch.float64):
        for part, stride in ((4, 1), (4, 2), (32, 1)):
            for name, (layer, probe) in _layers(args.channels, part, stride, dtype).items():
                converted = to_sparse(layer, probe=probe, memory_format=None)  # warm-up, and checked
                x = torch.randn(2, args.channels, 8, 8, dtype=dtype)
                with torch.no_grad():
                    error = float((converted(x) - layer(x)).norm() / layer(x).norm())
                if not error <= (1e-5 if dtype == torch.float32 else 1e-12):
                    raise SystemExit(f"{name}, {dtype}, P={part}, stride {stride}: converted layer off by {error:.3g}")
                times, cpu = [], []
                for _ in range(args.repeats):
                    start, start_cpu = time.perf_counter(), time.process_time()
                    to_sparse(layer, probe=probe, memory_format=None)
                    times.append(time.perf_counter() - start)
                    cpu.append(time.process_time() - start_cpu)
                rows.append({"layer": name, "dtype": str(dtype).replace("torch.", ""), "part": part, "stride": stride,
                             "fastest_s": min(times), "median_s": statistics.median(times), "cpu_s": min(cpu),
                             "relative_error": error})
                print(f"{name:<28} {rows[-1]['dtype']:<8} P={part:<3} stride {stride}: fastest {min(times):.3f} s, "
                      f"median {statistics.median(times):.3f} s, CPU {min(cpu):.3f} s (relative error {error:.1e})",
                      flush=True)
    setting = {"cpu": _cpu(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "channels": args.channels, "kernel_size": 3, "repeats": args.repeats}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"probe_cost_{args.threads}threads"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"setting": setting, "rows": rows}, indent=1))
    lines = [f"Probing one {args.channels} -> {args.channels} 3x3 layer with `to_sparse(layer, probe=...)`, "
             f"{args.repeats} runs: {setting['cpu']}, {args.threads} thread{'s' * (args.threads != 1)}, torch "
             f"{torch.__version__} (`python -m benchmarks.probe_cost --threads {args.threads}`).", "",
             "| layer | dtype | P | stride | wall, fastest (s) | wall, median (s) | CPU time (s) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['dtype']} | {r['part']} | {r['stride']} | {r['fastest_s']:.3f} | "
              f"{r['median_s']:.3f} | {r['cpu_s']:.3f} |" for r in rows]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
