"""glibc's malloc thresholds, which decide whether large activations are page-faulted afresh.

On glibc, a freed block larger than the *dynamic* mmap threshold is returned to the kernel and the
threshold then rises, so the first calls of a fresh process page-fault through fresh memory and a
convolution can take twice as long as in a warm one; likewise, freed memory at the top of the heap
beyond the trim threshold (128 KiB by default once the mmap threshold is fixed) is handed back, and
every later allocation of a large activation page-faults it in again (measured: a masked HetConv
layer on 32 x 64 x 32 x 32 inputs ran 3.2x slower). :func:`pin_mmap_threshold` fixes both
(``mallopt``; the same as ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824`` in
the environment) and :func:`mmap_threshold_pinned` checks that the first took effect. Older glibc
versions reject an mmap threshold above 32 MiB on 64-bit systems (silently, for the environment
variable), so 32 MiB is used. Off glibc both report that nothing could be done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "mmap_threshold_pinned", "pin_mmap_threshold"]

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
