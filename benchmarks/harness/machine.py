"""The facts a timing depends on: CPU model and instruction set, cores, threads, library versions, malloc.

glibc's malloc thresholds decide whether large activations are page-faulted afresh. On glibc, a
freed block larger than the *dynamic* mmap threshold is returned to the kernel and the threshold
then rises, so the first calls of a fresh process page-fault through fresh memory and a convolution
can take twice as long as in a warm one; likewise, freed memory at the top of the heap beyond the
trim threshold (128 KiB by default once the mmap threshold is fixed) is handed back, and every later
allocation of a large activation page-faults it in again (measured: a masked HetConv layer on 32 x
64 x 32 x 32 inputs ran 3.2x slower). :func:`pin_mmap_threshold` fixes both (``mallopt``; the same
as ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824`` in the environment) and
:func:`mmap_threshold_pinned` checks that the first took effect. Older glibc versions reject an mmap
threshold above 32 MiB on 64-bit systems (silently, for the environment variable), so 32 MiB is
used. Off glibc both report that nothing could be done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

import torch

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "cpu_isa", "gemm_gflops", "machine_info", "mmap_threshold_pinned",
           "pin_mmap_threshold", "sgemm_gflops"]

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


# -- glibc's malloc thresholds ----------------------------------------------------------------------

MMAP_THRESHOLD = 32 * 1024 * 1024  # the largest M_MMAP_THRESHOLD every glibc accepts on 64-bit
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)


def _libc():
    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds for this process (``mallopt``).

    Also sets ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` in ``os.environ`` so
    subprocesses inherit them.

    Args:
        threshold (int): bytes, at most :data:`MMAP_THRESHOLD` (the cap of older glibc on 64-bit).
        trim_threshold (int): free bytes at the top of the heap kept rather than returned.

    Returns:
        bool: whether glibc accepted both values (False off glibc, e.g. macOS or musl).

    Raises:
        ValueError: a threshold outside ``[0, 32 MiB]``.
    """
    if not 0 <= threshold <= MMAP_THRESHOLD:
        raise ValueError(f"threshold ({threshold}) must be between 0 and {MMAP_THRESHOLD} bytes "
                         "(glibc ignores larger values on 64-bit systems)")
    if not 0 <= trim_threshold < 2 ** 31:
        raise ValueError(f"trim_threshold ({trim_threshold}) must be between 0 and 2**31 - 1 bytes")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
    os.environ["MALLOC_TRIM_THRESHOLD_"] = str(trim_threshold)
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold))
    return bool(mmap_ok and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold)))


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def mmap_threshold_pinned(size: int = MMAP_THRESHOLD - (1 << 20)) -> bool | None:
    """Check that a ``size``-byte allocation comes from the heap, not from a fresh mmap.

    With the threshold pinned at 32 MiB a 31 MiB block is served from the heap (and reused
    after ``free``); with glibc's dynamic default it is mapped afresh by the kernel.

    Returns:
        bool or None: True when the block came from the heap, None when it cannot be checked
        (not glibc, or a glibc older than 2.33 without ``mallinfo2``).
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _Mallinfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(ctypes.c_size_t(size))
    try:
        mapped = libc.mallinfo2().hblkhd - before
    finally:
        libc.free(ctypes.c_void_p(block))
    return mapped < size
