"""Small, honest measuring tools: latency, training-state bytes and peak training memory.

Used by the demo, ``benchmarks/`` and the notebooks. Timings warm up first, use
``time.perf_counter``, synchronise CUDA when the tensors live there, interleave the variants being
compared (so a slow spell of a shared machine hits all of them alike) and report medians.

On glibc, a freed block larger than the *dynamic* mmap threshold is returned to the kernel and the
threshold then rises, so the first calls of a fresh process page-fault through fresh memory and a
convolution can take twice as long as in a warm one; likewise, freed memory at the top of the heap
beyond the trim threshold (128 KiB by default once the mmap threshold is fixed) is handed back, and
every later allocation of a large activation page-faults it in again (measured here: a masked
HetConv layer on 32 x 64 x 32 x 32 inputs ran 3.2x slower). :func:`pin_mmap_threshold` fixes both
(``mallopt``; the same as ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824`` in
the environment) and :func:`mmap_threshold_pinned` checks that the first took effect. Older glibc
versions reject an mmap threshold above 32 MiB on 64-bit systems (silently, for the environment
variable), so 32 MiB is used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

__all__ = [
    "MMAP_THRESHOLD",
    "TRIM_THRESHOLD",
    "interleaved_latency",
    "latency_vs_part",
    "machine_info",
    "measure_latency",
    "memory_vs_part",
    "mmap_threshold_pinned",
    "parameter_bytes",
    "peak_training_memory",
    "pin_mmap_threshold",
    "state_bytes",
    "tensor_peak_bytes",
    "vgg_training_step",
]

MMAP_THRESHOLD = 32 * 1024 * 1024  # the largest M_MMAP_THRESHOLD every glibc accepts on 64-bit
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(fn: Callable[[], object], warmup: int = 3, repeats: int = 10,
                    device: torch.device | str | None = None) -> dict[str, float]:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Returns:
        dict: ``median_ms``, ``min_ms``, ``max_ms`` and ``repeats``.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "repeats": repeats}


def interleaved_latency(fns: Mapping[str, Callable[[], object]], warmup: int = 2, repeats: int = 10,
                        device: torch.device | str | None = None,
                        progress: Callable[[], object] | None = None) -> dict[str, dict[str, float]]:
    """Time several callables in interleaved rounds; each round calls every one once.

    The order rotates from round to round, so neither position nor a slow spell of the machine
    favours one callable. ``warmup`` untimed calls of each come first.

    Args:
        fns: name -> callable taking no argument.
        warmup (int): untimed calls of each callable before the rounds.
        repeats (int): timed rounds (>= 1).
        device: synchronised around each call when it is a CUDA device.
        progress (callable, optional): called after each timed call (e.g. ``tqdm.update``).

    Returns:
        dict: name -> ``median_ms``, ``min_ms``, ``max_ms``, ``q1_ms``, ``q3_ms``, ``repeats``.

    Raises:
        ValueError: ``repeats < 1`` or no callable.
    """
    if repeats < 1 or not fns:
        raise ValueError(f"interleaved_latency needs repeats >= 1 and at least one callable, got "
                         f"repeats={repeats} and {len(fns)} callables")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
            if progress is not None:
                progress()
    result = {}
    for name, values in times.items():
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        result[name] = {"median_ms": statistics.median(values), "min_ms": min(values), "max_ms": max(values),
                        "q1_ms": quartiles[0], "q3_ms": quartiles[2], "repeats": repeats}
    return result


def parameter_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters (buffers excluded)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of a model's training state: parameters, gradients, optimizer state and buffers.

    Args:
        model (nn.Module): the model (after a training step, so gradients and optimizer state
            exist).
        optimizer (torch.optim.Optimizer, optional): its optimizer; every tensor in its state
            counts (momentum buffers, Adam's moments, step counters).

    Returns:
        dict: ``params``, ``grads``, ``optimizer``, ``buffers`` (BatchNorm statistics, masks) and
        ``training`` = params + grads + optimizer.
    """
    params = list(model.parameters())
    out = {
        "params": sum(_nbytes(p) for p in params),
        "grads": sum(_nbytes(p.grad) for p in params if p.grad is not None),
        "optimizer": 0,
        "buffers": sum(_nbytes(b) for b in model.buffers()),
    }
    if optimizer is not None:
        for state in optimizer.state.values():
            out["optimizer"] += sum(_nbytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    out["training"] = out["params"] + out["grads"] + out["optimizer"]
    return out


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


def machine_info() -> dict:
    """The facts a timing depends on: CPU, cores, threads, torch and its kernel libraries."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
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
    }


def vgg_training_step(part: int = 4, form: str = "sparse", batch: int = 32, memory_format: str = "channels_last",
                      backend: str = "auto", seed: int = 0) -> dict:
    """Build ``vgg16_cifar`` with SGD (momentum 0.9, weight decay 5e-4) and one step on random data.

    The builder :func:`peak_training_memory` uses by default; also handy on its own.

    Returns:
        dict: ``step`` (a callable running forward, cross-entropy, backward and the SGD step),
        ``model`` and ``optimizer``.
    """
    from .models import vgg16_cifar

    torch.manual_seed(seed)
    fmt = {"channels_last": torch.channels_last, "contiguous": None}[memory_format]
    model = vgg16_cifar(part=part, form=form, backend=backend, memory_format=fmt).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32)
    target = torch.randint(0, 10, (batch,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()

    return {"step": step, "model": model, "optimizer": optimizer}


_WORKER = r"""
import importlib, json, resource, sys
spec = json.loads(sys.argv[1])
sys.path[:0] = spec["path"]
from sparse_hetconv.profiling import (_peak_rss_bytes, _reset_peak_rss, _rss_bytes, mmap_threshold_pinned,
                                     pin_mmap_threshold, state_bytes, tensor_peak_bytes)
import torch
torch.set_num_threads(spec["threads"])
pinned = pin_mmap_threshold() if spec["pin"] else None
module, _, name = spec["builder"].partition(":")
builder = getattr(importlib.import_module(module), name)
base = _rss_bytes()
reset = _reset_peak_rss()
built = builder(**spec["kwargs"])
after_build = _rss_bytes()
for _ in range(spec["steps"]):
    built["step"]()
peak = _peak_rss_bytes()
tensor_peak = tensor_peak_bytes(built["step"], built["model"], built.get("optimizer"))
result = {"peak_bytes": peak - base, "build_bytes": after_build - base, "baseline_bytes": base,
          "tensor_peak_bytes": tensor_peak,
          "state": state_bytes(built["model"], built.get("optimizer")), "pinned": mmap_threshold_pinned(),
          "peak_reset": reset}
sys.stdout.write("RESULT " + json.dumps(result) + "\n")
"""


def tensor_peak_bytes(step: Callable[[], object], model: nn.Module | None = None,
                      optimizer: torch.optim.Optimizer | None = None) -> int:
    """The largest number of bytes held by live tensor storages while ``step()`` runs.

    Every operator's outputs are tracked (a ``TorchDispatchMode``, autograd's backward and the
    optimizer's kernels included) until their storage is freed; the model's parameters, gradients
    and buffers and the optimizer's state count from the start. Exact and deterministic, unlike
    the resident set size; it leaves out the allocator's overhead and tensors made before the call
    that the model and optimizer do not hold (e.g. the input batch). The step runs once, slowly.
    """
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    live: dict[int, tuple[StorageWeakRef, int]] = {}
    total = [0, 0]  # current, peak

    def track(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key and key not in live:
            live[key] = (StorageWeakRef(storage), storage.nbytes())
            total[0] += storage.nbytes()

    held = []
    if model is not None:
        held += list(model.parameters()) + [p.grad for p in model.parameters()] + list(model.buffers())
    if optimizer is not None:
        held += [v for state in optimizer.state.values() for v in state.values()]
    for t in held:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            track(t)
    total[1] = total[0]

    class Tracker(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for key in [k for k, (ref, _) in live.items() if ref.expired()]:  # freed before this op
                total[0] -= live.pop(key)[1]
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    track(t)
            total[1] = max(total[1], total[0])  # inputs and outputs of this op are all alive
            return out

    with Tracker():
        step()
    return total[1]


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0: ``/proc/self/clear_refs``),
    so that the peak measured next excludes what importing libraries touched and freed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """Peak RSS since the last reset (``VmHWM``), or since the start of the process."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes() -> int:
    """This process's resident set size now (Linux ``/proc/self/statm``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_training_memory(builder: str = "sparse_hetconv.profiling:vgg_training_step", kwargs: dict | None = None,
                         steps: int = 2, threads: int | None = None, path: list[str] | None = None,
                         pin: bool = True, timeout: float = 600) -> dict:
    """Peak memory of training steps, measured in a fresh Python process.

    The process imports torch and the builder, records its resident memory and resets its peak
    (Linux ``clear_refs``; elsewhere the peak since start is used), builds the model
    (``builder(**kwargs)`` returning a dict with ``step``, ``model`` and ``optimizer``), runs
    ``steps`` steps and reports its peak resident memory above that baseline (model, optimizer
    state, data and the step's activations; the allocator's own overhead included, so it varies by
    a few percent from run to run), then runs one more step under :func:`tensor_peak_bytes`, the
    exact peak of live tensor bytes (deterministic; no allocator overhead).

    Args:
        builder (str): ``"module:function"``, importable in the child process.
        kwargs (dict, optional): JSON-serialisable keyword arguments of the builder.
        steps (int): training steps to run (the first one creates gradients and optimizer state).
        threads (int, optional): torch threads in the child; default this process's.
        path (list of str, optional): directories prepended to the child's ``sys.path``.
        pin (bool): pin glibc's mmap threshold in the child (:func:`pin_mmap_threshold`).
        timeout (float): seconds before the child is abandoned.

    Returns:
        dict: ``peak_bytes``, ``tensor_peak_bytes``, ``build_bytes``, ``baseline_bytes``, ``state``
        (see :func:`state_bytes`), ``pinned`` and ``peak_reset`` (whether the peak could be reset).

    Raises:
        ValueError: ``builder`` is not ``"module:function"`` or ``steps < 1``.
        RuntimeError: the child process failed (its stderr is in the message).
    """
    if not isinstance(builder, str) or ":" not in builder:
        raise ValueError(f"builder ({builder!r}) must be a 'module:function' string")
    if steps < 1:
        raise ValueError(f"steps ({steps}) must be >= 1")
    spec = {"builder": builder, "kwargs": kwargs or {}, "steps": steps, "path": list(path or []),
            "threads": threads or torch.get_num_threads(), "pin": pin}
    env = dict(os.environ)
    if pin:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
        env["MALLOC_TRIM_THRESHOLD_"] = str(TRIM_THRESHOLD)
    proc = subprocess.run([sys.executable, "-c", _WORKER, json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"peak_training_memory: the child process for {builder} failed "
                           f"(exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# -- ready-made comparisons for the notebooks -------------------------------------------------------
_FORMS = ("standard_cl", "masked_nchw", "masked_cl", "sparse_cl")


def _form_module(form: str, part: int, shape: tuple[int, int, int] | None, seed: int) -> nn.Module:
    from .masked import MaskedHetConv2d
    from .models import vgg16_cifar
    from .sparse import SparseHetConv2d

    torch.manual_seed(seed)
    fmt = None if form.endswith("nchw") else torch.channels_last
    if shape is None:
        kind = "sparse" if form.startswith("sparse") else "masked"
        return vgg16_cifar(part=1 if form.startswith("standard") else part, form=kind, memory_format=fmt).eval()
    in_channels, out_channels, _ = shape
    if form.startswith("standard"):
        module = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    elif form.startswith("masked"):
        module = MaskedHetConv2d(in_channels, out_channels, part)
    else:
        module = SparseHetConv2d(in_channels, out_channels, part)
    return module.to(memory_format=fmt) if fmt is not None else module


def latency_vs_part(parts=(2, 4, 8), shape: tuple[int, int, int] | None = None, batch: int = 32,
                    repeats: int = 7, warmup: int = 2, forms=_FORMS, seed: int = 0) -> list[dict]:
    """Inference latency of the library's forms of one HetConv layer (or VGG-16) for each part.

    For each ``P`` the forms are timed together by :func:`interleaved_latency` (eval, ``no_grad``):
    ``standard_cl`` (a standard 3 x 3 convolution, channels-last: the reference of the FLOP-ideal
    time), ``masked_nchw`` (:class:`MaskedHetConv2d` in PyTorch's default layout, like the published
    code), ``masked_cl`` and ``sparse_cl`` (:class:`SparseHetConv2d`, ``backend="auto"``).

    Args:
        parts (sequence of int): the parts ``P`` (each must divide the channels).
        shape (tuple, optional): ``(in_channels, out_channels, size)`` of one layer; None times
            ``vgg16_cifar`` on 32 x 32 inputs instead.
        batch (int): batch size.
        repeats, warmup (int): as for :func:`interleaved_latency`.
        forms (sequence of str): a subset of the forms above.

    Returns:
        list of dict: one row per (part, form) with ``median_ms``, ``q1_ms``, ``q3_ms``,
        ``ideal_ms`` (the standard form's time x useful MACs(P) / MACs(P=1)) and ``over_ideal``.
    """
    from .counting import count_macs

    unknown = sorted(set(forms) - set(_FORMS))
    if unknown:
        raise ValueError(f"forms {unknown} are not known; choose from {_FORMS}")
    size = 32 if shape is None else shape[2]
    channels = 3 if shape is None else shape[0]
    x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))
    rows = []
    for part in parts:
        modules = {form: _form_module(form, part, shape, seed) for form in forms}
        inputs = {form: x.contiguous(memory_format=torch.channels_last) if form.endswith("_cl") else x
                  for form in forms}
        calls = {form: (lambda m=modules[form], i=inputs[form]: _no_grad_call(m, i)) for form in forms}
        stats = interleaved_latency(calls, warmup=warmup, repeats=repeats)
        if shape is None:
            ratio = count_macs(_form_module("sparse_cl", part, None, seed), (1, 3, 32, 32), norm=False) / count_macs(
                _form_module("standard_cl", part, None, seed), (1, 3, 32, 32), norm=False)
        else:
            from .pattern import HetConvPattern

            ratio = HetConvPattern(shape[0], shape[1], part).useful_macs_per_pixel() / (shape[1] * shape[0] * 9)
        ideal = stats["standard_cl"]["median_ms"] * ratio if "standard_cl" in stats else None
        for form, s in stats.items():
            rows.append({"part": part, "form": form, **s, "ideal_ms": ideal,
                         "over_ideal": s["median_ms"] / ideal if ideal else None})
    return rows


def _no_grad_call(module: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return module(x)


def memory_vs_part(parts=(2, 4, 8), batch: int = 32, forms=("masked", "sparse"), peak: bool = True) -> list[dict]:
    """Training memory of ``vgg16_cifar`` (channels-last, SGD with momentum) for each part and form.

    Returns:
        list of dict: one row per (part, form): ``params``, ``grads``, ``optimizer``, ``buffers``,
        ``training`` bytes (:func:`state_bytes`, after one step) and, with ``peak``, ``peak_bytes``
        (resident) and ``tensor_peak_bytes`` (live tensors) of a training step, measured in a fresh
        process (:func:`peak_training_memory`).
    """
    rows = []
    for part in parts:
        for form in forms:
            built = vgg_training_step(part=part, form=form, batch=batch)
            built["step"]()
            row = {"part": part, "form": form, **state_bytes(built["model"], built["optimizer"])}
            if peak:
                measured = peak_training_memory(kwargs={"part": part, "form": form, "batch": batch})
                row["peak_bytes"], row["tensor_peak_bytes"] = measured["peak_bytes"], measured["tensor_peak_bytes"]
            rows.append(row)
    return rows
