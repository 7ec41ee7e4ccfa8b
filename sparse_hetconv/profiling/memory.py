"""Memory: parameter and training-state bytes, the exact peak of live tensors, peak training RSS.

:func:`peak_training_memory` measures in a fresh process (``python -m
sparse_hetconv.profiling._memory_worker``), so that what this process already holds does not count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["parameter_bytes", "peak_training_memory", "state_bytes", "tensor_peak_bytes"]

# glibc's mmap threshold at the largest value every glibc accepts (32 MiB) and a 1 GiB trim
# threshold: freed activations stay in the heap instead of being faulted in afresh at every step.
_PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


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
    return _maxrss_bytes()


def _rss_bytes() -> int:
    """This process's resident set size now (Linux ``/proc/self/statm``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return _maxrss_bytes()


def peak_training_memory(builder: str, kwargs: dict | None = None, steps: int = 2, threads: int | None = None,
                         path: list[str] | None = None, pin: bool = True, timeout: float = 600) -> dict:
    """Peak memory of training steps, measured in a fresh Python process.

    The process imports torch and the builder, records its resident memory and resets its peak
    (Linux ``clear_refs``; elsewhere the peak since start is used), builds the model
    (``builder(**kwargs)`` returning a dict with ``step``, ``model`` and ``optimizer``), runs
    ``steps`` steps and reports its peak resident memory above that baseline (model, optimizer
    state, data and the step's activations; the allocator's own overhead included, so it varies by
    a few percent from run to run), then runs one more step under :func:`tensor_peak_bytes`, the
    exact peak of live tensor bytes (deterministic; no allocator overhead).

    Args:
        builder (str): ``"module:function"``, importable in the child process (the repository's
            ``benchmarks.harness.compare:vgg_training_step`` builds VGG-16 with SGD).
        kwargs (dict, optional): JSON-serialisable keyword arguments of the builder.
        steps (int): training steps to run (the first one creates gradients and optimizer state).
        threads (int, optional): torch threads in the child; default this process's.
        path (list of str, optional): directories prepended to the child's ``sys.path``.
        pin (bool): pin glibc's mmap and trim thresholds in the child (``MALLOC_MMAP_THRESHOLD_`` and
            ``MALLOC_TRIM_THRESHOLD_`` in its environment).
        timeout (float): seconds before the child is abandoned.

    Returns:
        dict: ``peak_bytes``, ``tensor_peak_bytes``, ``build_bytes``, ``baseline_bytes``, ``state``
        (see :func:`state_bytes`) and ``peak_reset`` (whether the peak could be reset).

    Raises:
        ValueError: ``builder`` is not ``"module:function"`` or ``steps < 1``.
        RuntimeError: the child process failed (its stderr is in the message) or timed out.
    """
    if not isinstance(builder, str) or ":" not in builder:
        raise ValueError(f"builder ({builder!r}) must be a 'module:function' string")
    if steps < 1:
        raise ValueError(f"steps ({steps}) must be >= 1")
    spec = {"builder": builder, "kwargs": kwargs or {}, "steps": steps, "path": list(path or []),
            "threads": threads or torch.get_num_threads()}
    env = {**os.environ, **(_PINNED_MALLOC if pin else {})}
    try:
        proc = subprocess.run([sys.executable, "-m", "sparse_hetconv.profiling._memory_worker", json.dumps(spec)],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"peak_training_memory: the child process for {builder} did not finish in "
                           f"{timeout} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"peak_training_memory: the child process for {builder} failed "
                           f"(exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _maxrss_bytes() -> int:
    """Peak RSS since the start of the process from ``getrusage`` (Unix only; 0 elsewhere)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
