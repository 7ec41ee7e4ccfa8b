"""How ``backend="auto"`` picks the backend that computes a HetConv layer.

Every backend computes the same numbers; which is fastest depends on the call's *signature* (shape,
part, kernel, stride, batch, device, dtype, memory format, training or not) and on the machine. The
choice is made once per signature and cached, in one of three modes (docs/performance.md):

* ``"confirm"`` (default): on the CPU the cost model proposes a backend (``fused`` for every call
  the compiled kernels compute, :func:`fused_proposed`; else ``grouped`` where :func:`estimate`
  predicts it 10 % faster, else ``dense``); a proposal other than ``dense`` is kept only if a
  one-off timing on random data of the signature confirms it beats ``dense``. On CUDA every
  candidate is timed (:func:`candidates`), like ``torch.backends.cudnn.benchmark``.
* ``"model"``: the cost model alone; nothing is timed.
* ``"measure"``: every candidate is timed on the first call of a signature (forward, plus
  backward when training) and the fastest kept, on any device.

Under graph capture, ``torch.func`` transforms and for fake or symbolic inputs the cost model
decides alone (nothing can be timed, and a compiled graph must not guard on the cache).

Example:
    >>> layer = SparseHetConv2d(256, 256, part=2)
    >>> x = torch.randn(32, 256, 8, 8).contiguous(memory_format=torch.channels_last)
    >>> choose(layer.pattern, x, training=True) in CONCRETE  # timed once here, then cached
    True
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from . import ops
from ._checks import check_model
from .backends import CONCRETE, Call, available, get
from .backends._common import channels_last, eager_call, eager_tensor, reduced_precision
from .pattern import HetConvPattern

__all__ = ["MODES", "candidates", "choose", "choices", "clear", "estimate", "fused_proposed", "get_mode", "mode",
           "resolve_backends", "set_mode", "signature"]

MODES = ("confirm", "model", "measure")
MARGIN = 0.9  # grouped must be predicted at least 10 % faster than dense to be chosen
FEW_PIXELS = 64  # inference calls with at most this many output pixels also time blocked against fused
# Calibrated with benchmarks/ on a 2-core AMD EPYC (AVX-512), torch 2.13, oneDNN 3.x, float32:
C0 = 16.0  # channels per group at which a convolution runs at half its peak efficiency
CALL = 1.0e6  # fixed cost of one operator call (about 8 us), in MAC-equivalents
PASS = 4.0  # an elementwise pass over long channel runs, MAC-equivalents per element
GROUPED_BACKWARD = 6.0  # grouped backward (weight gradients per group, sliced sums) vs its forward
MATMUL_SPEED = 0.5  # MKL matrix products relative to oneDNN convolutions (measured: 0.4-0.6)
SPARSE_SPEED = 0.15  # torch.sparse CSR products relative to oneDNN convolutions (measured)
_FAST_DTYPES = (torch.float32, torch.bfloat16)

_state = {"mode": "confirm"}
_CHOICES: dict[tuple, tuple[str, str]] = {}  # signature -> (backend, how it was decided)


def set_mode(value: str) -> None:
    """Choose how ``"auto"`` decides: ``"confirm"`` (default), ``"model"`` or ``"measure"``.

    Raises:
        ValueError: an unknown mode.
    """
    if value not in MODES:
        raise ValueError(f"mode ({value!r}) must be one of {MODES}")
    _state["mode"] = value


def get_mode() -> str:
    """The current mode: ``"confirm"``, ``"model"`` or ``"measure"``."""
    return _state["mode"]


@contextmanager
def mode(value: str) -> Iterator[None]:
    """Context manager form of :func:`set_mode`; restores the previous mode on exit."""
    previous = get_mode()
    set_mode(value)
    try:
        yield
    finally:
        _state["mode"] = previous


def clear() -> None:
    """Forget every cached choice (the next call of each signature decides again)."""
    _CHOICES.clear()


def choices() -> dict[tuple, tuple[str, str]]:
    """The cached decisions: ``signature -> (backend, how)``, ``how`` one of ``"model"``,
    ``"confirmed"`` (the model's proposal, timed faster than ``dense``), ``"refuted"`` (timed
    slower: the faster one kept, ``dense``, or ``blocked`` for an inference call of a few pixels)
    and ``"measure"``."""
    return dict(_CHOICES)


def _memory_format(input: Tensor) -> str:
    return "channels_last" if eager_tensor(input) and channels_last(input) else "contiguous"


def _dense_layout(t: Tensor) -> bool:
    """Whether ``t``'s elements fill its storage span exactly once (some permutation of a
    contiguous layout), so ``torch.empty_strided`` can reproduce it."""
    expected = 1
    for step, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if step != expected:
            return False
        expected *= size
    return True


def _weight_strides(weights) -> tuple:
    """The strides of the call's ``weight_kxk`` and ``weight_1x1`` where a timing can reproduce
    them (non-overlapping and dense), else None: the kernels a backend runs can depend on the
    weights' layout (``fused`` reads channels-last k x k weights in place for a few output pixels)."""
    return tuple(tuple(w.stride()) if isinstance(w, Tensor) and _dense_layout(w) else None
                 for w in tuple(weights)[:2])


def signature(pattern: HetConvPattern, input: Tensor | None, training: bool, stride: tuple[int, ...] | None = None,
              weights: tuple = (), padding=None, dilation=None) -> tuple:
    """The key a choice is cached under (everything the choice may depend on); ``weights``: the
    call's ``(weight_kxk, weight_1x1, ...)``, whose strides count."""
    if input is None:
        return (pattern.in_channels, pattern.out_channels, pattern.part, pattern.kernel_size, None, bool(training))
    call = Call.of(pattern, stride, padding, dilation)
    stride, padding, dilation = call.stride, call.padding, call.dilation
    return (pattern.in_channels, pattern.out_channels, pattern.part, pattern.kernel_size, stride, padding, dilation,
            tuple(input.shape), input.device.type, input.dtype, reduced_precision(input), _memory_format(input),
            bool(training), _weight_strides(weights))


def candidates(device: torch.device | str, dims: int = 2) -> tuple[str, ...]:
    """The backends timed on ``device`` for a ``dims``-D layer: every concrete backend available
    there (``fused``: 2-D, where the operator has a compiled kernel for the device: the CPU kernels
    where they were built, the Triton kernel on CUDA; ``triton`` is the same operator, so it is not
    timed twice, and under Triton's CPU interpreter it is exact but far too slow to be a candidate)."""
    device = torch.device(device)

    def timed(name: str) -> bool:
        if name == "triton":
            return False
        if name == "fused":
            return dims == 2 and (ops.cpu_kernel() is not None if device.type == "cpu" else
                                  device.type == "cuda" and ops.triton_kernel(device))
        return available(name, device)

    return tuple(name for name in CONCRETE if timed(name))


def _efficiency(channels: int) -> float:
    return channels / (channels + C0)


def _conv_cost(macs: float, c_in: int, c_out: int) -> float:
    return macs / (_efficiency(c_in) * _efficiency(c_out)) + CALL


def estimate(pattern: HetConvPattern, pixels: int, training: bool) -> dict[str, float]:
    """The cost model's estimate for each backend (MAC-equivalents; only ratios matter).

    A convolution with ``c_in`` / ``c_out`` channels per group runs at ``e(c_in) e(c_out)`` of its
    peak, ``e(c) = c / (c + C0)``, plus :data:`CALL` per call; an elementwise pass costs
    :data:`PASS` per element; matrix products run at :data:`MATMUL_SPEED`, CSR ones at :data:`SPARSE_SPEED`.

    Args:
        pattern: the layer.
        pixels (int): output pixels of the call, ``batch * prod(out_spatial)``.
        training (bool): whether autograd records the call (backward included in the cost).

    Returns:
        dict: backend name -> estimated cost of the 1 x 1 part (forward, or forward + backward).
    """
    M, N, P = pattern.in_channels, pattern.out_channels, pattern.part
    m, n = pattern.block_in, pattern.block_out
    out = pixels * N
    slice_pass = PASS * (1 + 128 / n)  # sums over channel runs of n floats: short runs cost more
    if training:  # forward, then the gradients of input and weight; the sum is a separate pass
        dense = 3 * _conv_cost(pixels * M * N, M, N) + PASS * out + CALL
        grouped = (P - 1) * ((1 + GROUPED_BACKWARD) * _conv_cost(pixels * m * N, m, n)
                             + 3 * (slice_pass * out + 2 * CALL))
    else:  # the sum into the k x k output is fused into the dense convolution
        dense = _conv_cost(pixels * M * N, M, N)
        grouped = (P - 1) * (_conv_cost(pixels * m * N, m, n) + slice_pass * out + 2 * CALL)
    passes = 3 if training else 1
    useful = pixels * (M - m) * N
    blocked = passes * (useful / (MATMUL_SPEED * _efficiency(m) * _efficiency(n)) + 2 * P * CALL) + PASS * out
    torch_sparse = passes * (useful / SPARSE_SPEED + CALL) + PASS * (out + pixels * M)
    return {"dense": dense, "grouped": grouped, "blocked": blocked, "torch_sparse": torch_sparse}


def fused_proposed(pattern: HetConvPattern, input: Tensor, training: bool) -> bool:
    """Whether the cost model proposes ``fused`` for this call (``confirm`` then times it).

    The compiled kernel multiplies only the useful weights, so on the shapes it was measured on
    (benchmarks/results/layers.md) it runs 0.5-1.0x the time of ``dense`` in most layers and up to
    ~1.15x in a few (groups of 16 filters at small ``P``, whose tiles hold one vector). The model
    proposes it for every call it computes: a 2-D float32 CPU call (bfloat16 and autocast calls
    would run in float32, where oneDNN has bfloat16 kernels), with the kernels built, in eager mode
    or graph capture (the operator is one node of the graph), not inside a ``torch.func``
    transform; the timing of ``confirm`` keeps ``dense`` where it loses.
    """
    if pattern.dims != 2 or input.device.type != "cpu" or input.dtype != torch.float32:
        return False
    return reduced_precision(input) is None and ops.cpu_kernel() is not None


def _output_pixels(input: Tensor, call: Call) -> int:
    pixels = input.shape[0]
    for size, k, s, p, d in zip(input.shape[2:], call.pattern.kernel_size, call.stride, call.padding, call.dilation):
        pixels *= (size + 2 * p - d * (k - 1) - 1) // s + 1
    return pixels


def _model_choice(call: Call, input: Tensor | None) -> str:
    pattern, training = call.pattern, call.grad
    if input is None or input.device.type != "cpu" or input.dtype not in _FAST_DTYPES:
        return "dense"
    if fused_proposed(pattern, input, training):
        return "fused"
    if not all(isinstance(size, int) for size in input.shape):
        return "dense"  # symbolic sizes (torch.export, dynamic torch.compile): no pixel count to weigh
    if not torch._C._has_mkldnn:  # what mkldnn.is_available() returns; dynamo cannot call that one
        return "dense"
    if _memory_format(input) != "channels_last":
        # In NCHW oneDNN reorders grouped convolutions' data; only dense was measured to hold up.
        return "dense"
    pixels = _output_pixels(input, call)  # output pixels, as estimate counts them
    costs = estimate(pattern, max(pixels, 1), training)
    return "grouped" if costs["grouped"] < MARGIN * costs["dense"] else "dense"


def choose(pattern: HetConvPattern, input: Tensor | None = None, training: bool | None = None,
           stride: tuple[int, ...] | None = None, weights: tuple = (), *, padding=None, dilation=None) -> str:
    """The backend ``"auto"`` uses for a layer of this pattern called on this input.

    Args:
        pattern: the layer's :class:`HetConvPattern`.
        input (Tensor, optional): the call's input (shape, device, dtype and memory format are
            read, never the values). Without one, or with symbolic sizes (a dynamic dimension
            under ``torch.export`` or ``torch.compile``), ``"dense"``.
        training (bool, optional): whether autograd records the call; default
            ``torch.is_grad_enabled()``.
        stride (tuple of int, optional): the layer's stride (part of the signature; timings use
            it). Default: 1.
        weights (tuple of Tensor, optional): the call's ``(weight_kxk, weight_1x1, ...)``: their
            strides are part of the signature and a timing lays its random weights out the same way
            (never their values). Default: contiguous weights.
        padding, dilation (tuple of int, optional): the layer's (default ``k // 2`` and 1).

    Under graph capture, inside ``torch.func`` transforms and for fake or symbolic inputs (whatever
    is not an ordinary eager tensor: nothing can be timed, and a compiled graph must not guard on the
    cache that eager calls keep extending) the cost model decides alone.

    Returns:
        str: the name of a concrete backend of :mod:`sparse_hetconv.backends`.
    """
    if training is None:
        training = torch.is_grad_enabled()
    if pattern.part == 1:
        return "dense"
    call = Call.of(pattern, stride, padding, dilation, grad=training)
    stride = call.stride
    if input is not None and not eager_call(input, *weights):
        return _model_choice(call, input)
    key = signature(pattern, input, training, stride, weights, call.padding, call.dilation)
    hit = _CHOICES.get(key)
    if hit is not None:
        return hit[0]
    mode = _state["mode"]
    if input is None:
        backend, how = "dense", "model"
    elif mode == "measure" or (mode == "confirm" and input.device.type != "cpu"):
        backend, how = _measured_choice(call, input, candidates(input.device, pattern.dims),
                                        _weight_strides(weights)), "measure"
    else:
        backend, how = _model_choice(call, input), "model"
        if mode == "confirm" and backend != "dense":
            names = ("dense", backend)
            if backend == "fused" and not training and _output_pixels(input, call) <= FEW_PIXELS:
                # A few output pixels (batch 1, deep layers): laying out the weights is most of the
                # fused kernel's time, and blocked, which reads them in place, can be faster.
                names += ("blocked",)
            timed = _measured_choice(call, input, names, _weight_strides(weights))
            backend, how = timed, "confirmed" if timed == backend else "refuted"
    _CHOICES[key] = (backend, how)
    return backend


def _measured_choice(call: Call, input: Tensor, names: tuple[str, ...], strides: tuple = (), repeats: int = 3) -> str:
    """Time each of ``names`` on random data of the call's signature (``strides``: the weights',
    from :func:`_weight_strides`); the fastest wins.

    The candidates are timed in interleaved rounds (each round calls every one once) after one
    warm-up call each, and compared by their best round, so a slow spell of a shared machine does
    not decide. A backend that fails on this signature (e.g. out of memory) is skipped.
    """
    if len(names) == 1:
        return names[0]
    pattern, training = call.pattern, call.grad
    factory = {"device": input.device, "dtype": input.dtype}
    with torch.inference_mode(False), torch.no_grad():
        x = torch.randn(input.shape, **factory)
        if _memory_format(input) == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last if input.dim() == 4 else torch.channels_last_3d)
        strides = tuple(strides) + (None, None)
        kxk = _random((pattern.out_channels, pattern.block_in) + pattern.kernel_size, strides[0], factory)
        values = _random((pattern.out_channels, pattern.num_1x1), strides[1], factory)
    sync = torch.cuda.synchronize if input.device.type == "cuda" else (lambda: None)

    def run(backend: str) -> None:
        with torch.enable_grad() if training else torch.no_grad():
            args = [t.detach().requires_grad_(training) for t in (x, kxk, values)]
            out = get(backend)(args[0], args[1], args[2], None, call)
            if training:
                out.backward(torch.ones_like(out))

    timings: dict[str, float] = {}
    for backend in names:
        try:
            run(backend)  # warm-up (primitive creation, kernel compilation)
            timings[backend] = math.inf
        except (RuntimeError, ValueError):
            continue
    sync()
    for _ in range(repeats):
        for backend in timings:
            start = time.perf_counter()
            run(backend)
            sync()
            timings[backend] = min(timings[backend], time.perf_counter() - start)
    return min(timings, key=timings.get) if timings else "dense"


def _random(shape: tuple, strides: tuple | None, factory: dict) -> Tensor:
    """Standard normal values of ``shape``, laid out with ``strides`` (when given)."""
    if strides is None or len(strides) != len(shape):
        return torch.randn(shape, **factory)
    return torch.empty_strided(shape, strides, **factory).normal_()


def resolve_backends(model: nn.Module, example_input: Tensor, training: bool = False,
                     pin: bool = False) -> dict[str, str]:
    """What ``"auto"`` resolves to in every sparse HetConv layer of ``model`` for this input.

    Runs one forward pass (under ``torch.no_grad`` unless ``training``) with every module in eval
    mode (so BatchNorm statistics are not touched; the train/eval flags are restored after) and
    reads each layer's :attr:`~sparse_hetconv.SparseHetConv2d.resolved_backend`.

    Args:
        model (nn.Module): a model with :class:`SparseHetConv2d` / ``3d`` layers.
        example_input (Tensor): a representative input (its shape, dtype, device, format count).
        training (bool): resolve for training calls (autograd on) instead of inference.
        pin (bool): also assign each choice to the layer's ``backend``, so it no longer changes
            with the input (``layer.backend = "auto"`` undoes it).

    Returns:
        dict: layer name -> backend, for the layers with ``part > 1``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``example_input`` not a tensor.
    """
    check_model(model)
    if not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    # Sparse HetConv layers (this module sits below the layers and does not import them).
    layers = {name: m for name, m in model.named_modules()
              if hasattr(m, "resolved_backend") and hasattr(m, "pattern") and m.part > 1}
    saved = {name: m.backend for name, m in layers.items()}
    flags = [(m, m.training) for m in model.modules()]
    for m in layers.values():
        m.backend = "auto"
    try:
        model.eval()
        with torch.enable_grad() if training else torch.no_grad():
            model(example_input)
    finally:
        for name, m in layers.items():
            m.backend = saved[name]
        for m, flag in flags:
            m.training = flag
    resolved = {name: m.resolved_backend for name, m in layers.items()}
    if pin:
        for name, m in layers.items():
            m.backend = resolved[name]
    return resolved
