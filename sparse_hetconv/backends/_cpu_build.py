"""Build and load the compiled CPU kernels of the ``fused`` backend (``csrc/hetconv_cpu.cpp``).

The source is plain C++ (no PyTorch headers), compiled on first use into a per-user cache
(``$SPARSE_HETCONV_BUILD_DIR``, else ``$XDG_CACHE_HOME/sparse_hetconv``, else
``~/.cache/sparse_hetconv``): two shared libraries, one with 16-lane AVX-512 vectors and one with
8-lane AVX2 vectors, each named by a hash of the source, the flags and the compiler, so a changed
source or compiler builds afresh and concurrent processes never see a half-written file (each
writes its own temporary file and renames it into place). Building takes a few seconds; ``make
install`` does it once (``python -m sparse_hetconv.backends --build``).

Which build runs is the widest one this CPU supports, capped by ``SPARSE_HETCONV_MAX_ISA``
(``"avx2"`` or ``"avx512"``; the benchmarks set it beside oneDNN's ``ONEDNN_MAX_CPU_ISA`` to measure
an AVX2 machine on an AVX-512 one). Without a C++ compiler, on a CPU without AVX2 and FMA, or off
x86-64, nothing is built: :func:`load` returns None and :func:`reason` says why, and ``auto``
never picks the backend.

The libraries link OpenMP; the runtime is the one PyTorch has already loaded (``libgomp.so.1``),
so the kernels share PyTorch's threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

__all__ = ["ISAS", "Library", "build_dir", "isa", "load", "reason"]

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "hetconv_cpu.cpp"
#: ISA name -> (compiler flags, preprocessor switch), widest first.
ISAS = {
    "avx512": ("-mavx512f -mavx512vl -mavx512bw -mavx512dq -mfma -mavx2", "SHC_AVX512"),
    "avx2": ("-mavx2 -mfma", "SHC_AVX2"),
}
_COMMON = "-O3 -std=c++17 -fPIC -shared -fopenmp -fno-math-errno -Wno-ignored-attributes"
# The CPU flags each build needs (from /proc/cpuinfo).
_NEEDS = {"avx512": ("avx512f", "avx512vl", "avx512bw", "avx512dq", "fma", "avx2"), "avx2": ("avx2", "fma")}

_lock = threading.Lock()
_state: dict = {}


def build_dir() -> Path:
    """Where the compiled libraries are cached."""
    explicit = os.environ.get("SPARSE_HETCONV_BUILD_DIR")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "sparse_hetconv"


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def isa() -> str | None:
    """The build this process runs: the widest ISA the CPU has, capped by ``SPARSE_HETCONV_MAX_ISA``;
    None where neither fits (no AVX2 and FMA, or not x86-64)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    flags = _cpu_flags()
    cap = os.environ.get("SPARSE_HETCONV_MAX_ISA", "").strip().lower()
    names = list(ISAS)
    if cap in ISAS:
        names = names[names.index(cap):]
    for name in names:
        if all(flag in flags for flag in _NEEDS[name]):
            return name
    return None


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _compiler_id(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else cxx
    except (OSError, subprocess.SubprocessError):
        return cxx


class Library:
    """One loaded build: its ctypes functions, without the ISA suffix, and its vector width."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.isa = path, name
        lib = ctypes.CDLL(str(path))
        p, i64, i32, i64p = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)
        signatures = {
            "shc_lanes": ([], i32),
            "shc_panel_floats": ([i64p, i32], i64),
            "shc_pack": ([p, i64p, p, i64p, i64p, i32, i32, p, i32], None),
            "shc_forward": ([p, p, p, p, i64p, i32, i32, i64, i32, i32], None),
            "shc_wgrad_needs_work": ([i64p, i32, i32], i32),
            "shc_wgrad": ([p, p, p, i64p, i32, i32, i64, p, i32], None),
            "shc_unpack_side": ([p, i64p, i32, p, i32], None),
            "shc_unpack_centre": ([p, i64p, p, p, i32], None),
            "shc_direct_applies": ([i64p], i32),
            "shc_direct_panel_floats": ([i64p], i64),
            "shc_direct_pack": ([p, i64p, p, i64p, i64p, i32, p, i32], None),
            "shc_direct_forward": ([p, p, p, p, i64p, i32], None),
            "shc_dot_forward": ([p, p, i64p, p, i64p, p, p, i64p, i32], None),
            "shc_gv_transpose": ([p, i64, i64, i64, p, i32], None),
            "shc_gv_pack": ([p, i64p, i64p, i32, p], None),
            "shc_gvo_panel_floats": ([i64p], i64),
            "shc_gvo_pack": ([p, i64p, p, i64p, i64p, i32, p, i32], None),
            "shc_gvo_forward": ([p, p, p, p, p, p, i64p, i64, i32], None),
            "shc_gv_wgrad": ([p, p, p, i64p, i64, p, i32], None),
            "shc_gv_unpack": ([p, i64p, p], None),
        }
        for fn, (args, res) in signatures.items():
            f = getattr(lib, f"{fn}_{name}")
            f.argtypes, f.restype = args, res
            setattr(self, fn, f)
        self.lanes = self.shc_lanes()
        self._lib = lib


def _build(name: str) -> Path:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (looked for $CXX, c++, g++, clang++)")
    flags, switch = ISAS[name]
    command = [cxx, *_COMMON.split(), *flags.split(), f"-D{switch}"]
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(command).encode() + _compiler_id(cxx).encode()).hexdigest()[:16]
    target = build_dir() / f"hetconv_cpu_{name}_{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem, suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([*command, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"{cxx} failed to build {SOURCE.name} ({name}): {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load() -> Library | None:
    """The library of this process's ISA, built on first use; None if it cannot be (see :func:`reason`).

    The ISA is decided on the first call (``SPARSE_HETCONV_MAX_ISA`` is read then)."""
    if "loaded" in _state:
        return _state["loaded"]
    name = isa()
    with _lock:
        if "loaded" in _state:
            return _state["loaded"]
        library = None
        if name is None:
            _state["reason"] = (f"the CPU has neither AVX-512 nor AVX2 with FMA ({platform.machine()}), or "
                                "SPARSE_HETCONV_MAX_ISA excludes the ones it has")
        else:
            try:
                library = Library(_build(name), name)
            except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as error:
                _state["reason"] = f"building the CPU kernels failed: {error}"
        _state[name] = _state["loaded"] = library
        return library


def reason() -> str | None:
    """Why :func:`load` returned None (after it did), else None."""
    return _state.get("reason") if load() is None else None
