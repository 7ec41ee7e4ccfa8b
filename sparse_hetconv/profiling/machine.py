"""The facts a timing depends on: CPU model and instruction set, cores, threads, library versions."""

from __future__ import annotations

import os
import platform

import torch

from .malloc import mmap_threshold_pinned

__all__ = ["cpu_isa", "gemm_gflops", "machine_info", "sgemm_gflops"]

# Instruction-set extensions that change which kernels oneDNN and MKL run, widest first.
_ISA_FLAGS = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512_vnni", "avx512f", "avx2", "avx")


def _cpuinfo(field: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_isa() -> str:
    """The widest x86 vector ISA of this CPU: ``"AVX-512+AMX"``, ``"AVX-512"``, ``"AVX2"``, ``"AVX"``,
    or the machine type (``platform.machine()``) where ``/proc/cpuinfo`` has no x86 flags."""
    flags = set((_cpuinfo("flags") or "").split())
    if "avx512f" in flags:
        return "AVX-512+AMX" if "amx_tile" in flags else "AVX-512"
    if "avx2" in flags:
        return "AVX2"
    if "avx" in flags:
        return "AVX"
    return platform.machine() or "unknown"


def machine_info() -> dict:
    """CPU (model, ISA), cores, threads, torch and its kernel libraries, GPU, Python, malloc pinning,
    and the system's load average over the last minute (POSIX; None elsewhere)."""
    flags = set((_cpuinfo("flags") or "").split())
    return {
        "cpu": _cpuinfo("model name") or platform.processor() or platform.machine(),
        "isa": cpu_isa(),
        "isa_flags": [flag for flag in _ISA_FLAGS if flag in flags],
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onednn": torch.backends.mkldnn.is_available(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mmap_threshold_env": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "trim_threshold_env": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        "mmap_threshold_pinned": mmap_threshold_pinned(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # runnable processes, 1 min
    }


def _best_seconds(fn, repeats: int) -> float:
    import time

    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_gflops(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """float32 GFLOP/s here of the two large products PyTorch's CPU kernels run, best of
    ``repeats`` each: a square ``torch.mm`` of ``size`` (MKL) and a channels-last 1 x 1 convolution
    of ``size / 2`` channels (oneDNN). Either library can be the faster one: MKL does not run its
    AVX-512 code on every vendor's CPU, and oneDNN's convolutions are tuned per ISA."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    mm = 2 * size ** 3 / _best_seconds(lambda: torch.mm(a, b), repeats) / 1e9
    channels = size // 2
    x = torch.randn(8, channels, 32, 32).contiguous(memory_format=torch.channels_last)
    w = torch.randn(channels, channels, 1, 1).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        seconds = _best_seconds(lambda: torch.nn.functional.conv2d(x, w), repeats)
    conv = 2 * 8 * 32 * 32 * channels * channels / seconds / 1e9
    return {"torch.mm (MKL)": round(mm, 1), "1x1 convolution (oneDNN)": round(conv, 1)}


def sgemm_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The practical float32 peak against which a kernel's effective GFLOP/s are read (at this
    many threads): the faster of :func:`gemm_gflops`'s two products."""
    return max(gemm_gflops(size, repeats).values())
