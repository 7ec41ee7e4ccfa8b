"""Ready-made comparisons of the HetConv forms for the notebooks: latency and memory against P.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120.
"""

from __future__ import annotations

import torch
from torch import nn

from ..counting import count_macs
from ..masked import MaskedHetConv2d
from ..models import vgg16_cifar
from ..pattern import HetConvPattern
from ..sparse import SparseHetConv2d
from .memory import peak_training_memory, state_bytes
from .timing import interleaved_latency

__all__ = ["latency_vs_part", "memory_vs_part", "vgg_training_step"]


def vgg_training_step(part: int = 4, form: str = "sparse", batch: int = 32, memory_format: str = "channels_last",
                      backend: str = "auto", seed: int = 0) -> dict:
    """Build ``vgg16_cifar`` with SGD (momentum 0.9, weight decay 5e-4) and one step on random data.

    The builder :func:`peak_training_memory` uses by default; also handy on its own.

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
        list of dict: one row per (part, form) with ``median_ms``, ``q1_ms``, ``q3_ms``,
        ``ideal_ms`` (the standard form's time x useful MACs(P) / MACs(P=1)) and ``over_ideal``.
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
            ratio = count_macs(_form_module("sparse_cl", part, None, seed), (1, 3, 32, 32), norm=False) / count_macs(
                _form_module("standard_cl", part, None, seed), (1, 3, 32, 32), norm=False)
        else:
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
