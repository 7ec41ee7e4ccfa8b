"""A VGG-16 (P = 4, batch 32) training step in float32 and under bfloat16 autocast, on the CPU.

bfloat16 is only fast where the CPU has bfloat16 instructions (AVX-512-BF16, AMX): elsewhere
PyTorch's and oneDNN's bfloat16 kernels emulate them, and a step is many times slower than in
float32. To see what a CPU without them does, cap both libraries to AVX2:
``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python -m benchmarks.bf16_step``. Both steps are
timed in interleaved rounds (``--threads``, default 1, so that a busy machine disturbs less).
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from sparse_hetconv import profiling

from .harness import compare, machine, verdict


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bf16_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))

    def step(dtype):
        built = compare.vgg_training_step(part=4, batch=32)
        model, optimizer = built["model"], built["optimizer"]

        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        return run

    stats = profiling.interleaved_latency({d: step(d) for d in ("float32", "bfloat16")}, warmup=2,
                                          repeats=args.repeats)
    info = machine.machine_info()
    print(f"{info['cpu']} ({', '.join(info['isa_flags'])}), {args.threads} thread(s), torch {info['torch']}, "
          f"load average {info['load_average']}; ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}, "
          f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY')}")
    for name, s in stats.items():
        print(f"  {name}: {s['median_ms']:.0f} ms [{s['q1_ms']:.0f}-{s['q3_ms']:.0f}]")
    print("  " + verdict.speedup_text("bfloat16", "float32", verdict.speedup(stats, "bfloat16", "float32")))


if __name__ == "__main__":
    main()
