"""Ready-made comparisons of the HetConv forms for the notebooks: latency and memory against P.

Built on the package's measuring tools (:mod:`sparse_hetconv.profiling`). HetConv: Singh et al.,
CVPR 2019, https://arxiv.org/abs/1903.04120.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from torch import nn

from sparse_hetconv.counting import count_macs
from sparse_hetconv.masked import MaskedHetConv2d
from sparse_hetconv.models import vgg16_cifar
from sparse_hetconv.pattern import HetConvPattern
from sparse_hetconv.profiling import interleaved_latency, peak_training_memory, state_bytes
from sparse_hetconv.sparse import SparseHetConv2d

__all__ = ["latency_vs_part", "memory_vs_part", "vgg_training_step"]

REPO = Path(__file__).resolve().parents[2]  # the memory subprocesses import this module from here


def vgg_training_step(part: int = 4, form: str = "sparse", batch: int = 32, memory_format: str = "channels_last",
                      backend: str = "auto", seed: int = 0) -> dict:
    """Build ``vgg16_cifar`` with SGD (momentum 0.9, weight decay 5e-4) and one step on random data.

    The builder :func:`memory_vs_part` gives :func:`~sparse_hetconv.profiling.peak_training_memory`;
    also handy on its own.

    Returns:
        dict: ``step`` (a callable running forward, cross-entropy, backward and the SGD step),
        ``model`` and ``optimizer``.
    """
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


_FORMS = ("standard_cl", "masked_nchw", "masked_cl", "sparse_dense_cl", "sparse_fused_cl", "sparse_cl")
_BACKEND = {"sparse_dense_cl": "dense", "sparse_fused_cl": "fused", "sparse_cl": "auto"}
DEFAULT_FORMS = ("standard_cl", "masked_nchw", "masked_cl", "sparse_cl")


def _form_module(form: str, part: int, shape: tuple[int, int, int] | None, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    fmt = None if form.endswith("nchw") else torch.channels_last
    backend = _BACKEND.get(form, "auto")
    if shape is None:
        kind = "sparse" if form.startswith("sparse") else "masked"
        return vgg16_cifar(part=1 if form.startswith("standard") else part, form=kind, memory_format=fmt,
                           backend=backend).eval()
    in_channels, out_channels, _ = shape
    if form.startswith("standard"):
        module = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    elif form.startswith("masked"):
        module = MaskedHetConv2d(in_channels, out_channels, part)
    else:
        module = SparseHetConv2d(in_channels, out_channels, part, backend=backend)
    return module.to(memory_format=fmt) if fmt is not None else module


def latency_vs_part(parts=(2, 4, 8), shape: tuple[int, int, int] | None = None, batch: int = 32,
                    repeats: int = 7, warmup: int = 2, forms=DEFAULT_FORMS, seed: int = 0) -> list[dict]:
    """Inference latency of the library's forms of one HetConv layer (or VGG-16) for each part.

    For each ``P`` the forms are timed together by :func:`interleaved_latency` (eval, ``no_grad``):
    ``standard_cl`` (a standard 3 x 3 convolution, channels-last: the reference of the FLOP-ideal
    time), ``masked_nchw`` (:class:`MaskedHetConv2d` in PyTorch's default layout, like the published
    code), ``masked_cl``, ``sparse_cl`` (:class:`SparseHetConv2d`, ``backend="auto"``: what the models
    ship) and, on request, ``sparse_dense_cl`` (the stock kernels: grouped k x k plus the dense
    1 x 1 product) and ``sparse_fused_cl`` (the compiled kernel over only the existing weights).

    Args:
        parts (sequence of int): the parts ``P`` (each must divide the channels).
        shape (tuple, optional): ``(in_channels, out_channels, size)`` of one layer; None times
            ``vgg16_cifar`` on 32 x 32 inputs instead.
        batch (int): batch size.
        repeats, warmup (int): as for :func:`interleaved_latency`.
        forms (sequence of str): a subset of the forms above.

    Returns:
        list of dict: one row per (part, form) with ``median_ms``, ``min_ms``, ``max_ms``,
        ``q1_ms``, ``q3_ms``, ``times_ms`` (round order, for :func:`~.verdict.speedup`),
        ``ideal_ms`` (the standard form's time x useful MACs(P) / MACs(P=1)), ``over_ideal`` and
        ``useful_macs`` (of the call; the standard form's are all its MACs), ready for
        :func:`~.verdict.flag_implausible`.
    """
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
            useful, full = (count_macs(_form_module(f, part, None, seed), (batch, 3, 32, 32), norm=False)
                            for f in ("sparse_cl", "standard_cl"))
        else:
            useful = HetConvPattern(shape[0], shape[1], part).useful_macs_per_pixel() * batch * size * size
            full = shape[1] * shape[0] * 9 * batch * size * size
        ideal = stats["standard_cl"]["median_ms"] * useful / full if "standard_cl" in stats else None
        for form, s in stats.items():
            rows.append({"part": part, "form": form, **s, "ideal_ms": ideal,
                         "over_ideal": s["median_ms"] / ideal if ideal else None,
                         "useful_macs": full if form.startswith("standard") else useful})
    return rows


def _no_grad_call(module: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return module(x)


def memory_vs_part(parts=(2, 4, 8), batch: int = 32, forms=("masked", "sparse"), peak: bool = True,
                   repeats: int = 1) -> list[dict]:
    """Training memory of ``vgg16_cifar`` (channels-last, SGD with momentum) for each part and form.

    Forms: ``"masked"``, ``"sparse"``, and ``"standard"``: the same network with standard
    convolutions (``vgg16_cifar(part=1)``), the baseline, measured once (its row has part 1).

    Returns:
        list of dict: one row per (part, form): ``params``, ``grads``, ``optimizer``, ``buffers``,
        ``training`` bytes (:func:`state_bytes`, after one step) and, with ``peak``, ``peak_bytes``
        (resident: the median of ``peak_runs = repeats`` fresh processes, with ``peak_min_bytes`` and
        ``peak_max_bytes``) and ``tensor_peak_bytes`` (live tensors, exact) of a training step
        (:func:`peak_training_memory`).

    Raises:
        ValueError: an unknown form or ``repeats < 1``.
    """
    unknown = sorted(set(forms) - {"standard", "masked", "sparse"})
    if unknown or repeats < 1:
        raise ValueError(f"forms {unknown} are not known (choose from standard, masked, sparse) or repeats "
                         f"({repeats}) < 1")
    jobs = [(1, "standard")] * ("standard" in forms) + [(p, f) for p in parts for f in forms if f != "standard"]
    rows = []
    for part, form in jobs:
        kwargs = {"part": part, "form": "sparse" if form == "standard" else form, "batch": batch}
        built = vgg_training_step(**kwargs)
        built["step"]()
        row = {"part": part, "form": form, **state_bytes(built["model"], built["optimizer"])}
        if peak:
            runs = [peak_training_memory(f"{__name__}:vgg_training_step", kwargs, path=[str(REPO)])
                    for _ in range(repeats)]
            resident = [run["peak_bytes"] for run in runs]
            row.update(peak_bytes=statistics.median(resident), peak_min_bytes=min(resident),
                       peak_max_bytes=max(resident), peak_runs=repeats, tensor_peak_bytes=runs[0]["tensor_peak_bytes"])
        rows.append(row)
    return rows
