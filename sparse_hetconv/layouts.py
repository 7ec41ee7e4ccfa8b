"""Readers of HetConv layouts: the exact HetConv content of a masked layer, the published
``gwc``/``pwc`` module, or any module that computes a HetConv as a signed sum of convolutions.

The converters (:mod:`sparse_hetconv.convert`, :mod:`~sparse_hetconv.shifted`,
:mod:`~sparse_hetconv.counting`) and :meth:`SparseHetConv2d.from_masked` read models through
:func:`read_hetconv_weights`; docs/design.md §4 lists what it accepts.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ._probe import no_global_hooks, probe_input, quiet_copy
from .masked import _MaskedHetConvNd
from .pattern import HetConvPattern

__all__ = ["HetConvWeights", "NotAHetConvError", "dense_conv_weight", "hetconv_kind", "read_hetconv_weights"]

_CONV_TYPES = {2: nn.Conv2d, 3: nn.Conv3d}


class HetConvWeights(NamedTuple):
    """The exact HetConv content of a module: what every form of the layer is built from."""

    pattern: HetConvPattern
    stride: tuple[int, ...]
    weight_kxk: Tensor  # (N, m, *kernel_size), block diagonal of the 1x1 part folded in
    dense_1x1: Tensor  # (N, M) with a zero block diagonal
    bias: Tensor | None
    padding: tuple[int, ...] | None = None  # of the k x k part; None: dilation * (k // 2)
    dilation: tuple[int, ...] | None = None  # None: 1
    padding_mode: str = "zeros"

    def geometry(self) -> dict:
        """The layer's keyword arguments ``padding``, ``dilation`` and ``padding_mode``."""
        return {"padding": self.padding, "dilation": 1 if self.dilation is None else self.dilation,
                "padding_mode": self.padding_mode}


class NotAHetConvError(ValueError):
    """A module of convolutions that is not an exact HetConv (``to_sparse`` leaves such a module
    alone unless it claims to be one: a masked layer, or children named ``gwc``/``pwc``)."""


def hetconv_kind(module: nn.Module) -> str | None:
    """How :func:`read_hetconv_weights` would read ``module``: ``"masked"`` (a masked layer),
    ``"published"`` (children ``gwc`` and ``pwc``), ``"sum"`` (children that are all convolutions
    of one dimension, at least one grouped k x k and one 1 x 1, with the same channels and stride,
    and nothing else: a candidate for a signed sum of them), or None."""
    if isinstance(module, _MaskedHetConvNd):
        return "masked"
    if isinstance(getattr(module, "gwc", None), nn.Module) and isinstance(getattr(module, "pwc", None), nn.Module):
        return "published"
    return "sum" if _sum_children(module) else None


def read_hetconv_weights(module: nn.Module, path: str = "") -> HetConvWeights:
    """Read a masked HetConv, or any module that computes one as a sum of convolutions, exactly.

    Accepted (docs/design.md §4):

    * :class:`MaskedHetConv2d` / ``3d``, whose ``gwc`` and ``pwc`` must be the convolutions its
      ``part``, kernel size and stride declare (a ``gwc`` swapped for one with other ``groups``
      is refused, not read as a layer of another part).
    * A module whose only children are convolutions of one dimension with the same channels and
      stride, at least one a grouped k x k (odd k, padding ``k // 2``) and one a 1 x 1, whose
      forward returns a *signed sum* of them (the published ``gwc(x) + pwc(x)``, sxpro's
      ``conv3x3(x) + conv1x1(x) - conv1x1_(x)``, ...). The coefficients are found on a random
      float64 probe of a hook-free copy and the result checked against the module's output; the
      part is the gcd of the k x k children's ``groups``, and the sum is formed in float64 and
      rounded once to the module's dtype.

    Args:
        module (nn.Module): the module.
        path (str): its path in the model, for messages.

    Returns:
        HetConvWeights: pattern, stride, ``weight_kxk (Tensor[N, M/P, *k])``, ``dense_1x1
        (Tensor[N, M])`` with a zero block diagonal, and the bias (Tensor[N] or None), in the
        module's dtype and on its device.

    Raises:
        ValueError: a masked layer whose children do not match its declared pattern, a module
            with ``gwc``/``pwc`` children that is not an exact HetConv; the message names
            ``path``.
        NotAHetConvError (a ValueError): any other module of convolutions that is not one (the
            message says why).
    """
    where = f"module '{path or '<root>'}' ({type(module).__name__})"
    kind = hetconv_kind(module)
    if kind == "masked":
        return _read_masked(module, where)
    if kind == "published":
        gwc, pwc = module.gwc, module.pwc
        conv_types = tuple(_CONV_TYPES.values())
        if not isinstance(gwc, conv_types) or not isinstance(pwc, conv_types) or type(gwc) is not type(pwc):
            raise ValueError(f"{where} is not a HetConv: expected children 'gwc' and 'pwc' that are both "
                             f"nn.Conv2d or both nn.Conv3d, got {type(gwc).__name__} and {type(pwc).__name__}")
        dims = 2 if isinstance(gwc, nn.Conv2d) else 3
        children = [name for name, _ in module.named_children()]
        if sorted(children) != ["gwc", "pwc"] or _has_own_tensors(module):
            raise ValueError(f"{where} holds more than gwc and pwc (children {sorted(children)}); "
                             "only a module computing gwc(x) + pwc(x) converts exactly")
        _check_published_pair(gwc, pwc, dims, where)
        return _read_sum(module, [("gwc", gwc), ("pwc", pwc)], dims, gwc.groups, where, ValueError)
    convs = _sum_children(module)
    if not convs:
        raise NotAHetConvError(f"{where} is not a HetConv: expected a masked layer or a module whose only "
                               "children are a grouped k x k and 1 x 1 convolutions")
    dims = 2 if isinstance(convs[0][1], nn.Conv2d) else 3
    problems = _sum_problems(convs, dims)
    if problems:
        raise NotAHetConvError(f"{where} cannot be read as a HetConv: " + "; ".join(problems))
    part = math.gcd(*(c.groups for _, c in convs if _is_kxk(c)))
    return _read_sum(module, convs, dims, part, where, NotAHetConvError)


def _has_own_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _is_kxk(conv: nn.Module) -> bool:
    return any(k != 1 for k in conv.kernel_size)


def _sum_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The children of a candidate signed sum of convolutions (see :func:`hetconv_kind`), or []."""
    if isinstance(module, nn.modules.conv._ConvNd) or _has_own_tensors(module):
        return []
    convs = list(module.named_children())
    if len(convs) < 2:
        return []
    for conv_type in _CONV_TYPES.values():
        if all(isinstance(c, conv_type) for _, c in convs):
            break
    else:
        return []
    first = convs[0][1]
    if any((c.in_channels, c.out_channels, tuple(c.stride)) != (first.in_channels, first.out_channels,
                                                                 tuple(first.stride)) for _, c in convs):
        return []
    kxk = [c for _, c in convs if _is_kxk(c)]
    if not kxk or len(kxk) == len(convs) or math.gcd(*(c.groups for c in kxk)) == 1:
        return []
    return convs


def _sum_problems(convs: list[tuple[str, nn.Module]], dims: int) -> list[str]:
    problems = []
    for name, conv in convs:
        if any(d != 1 for d in conv.dilation) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            problems.append(f"{name} must have dilation 1, padding_mode 'zeros' and numeric padding")
        elif any(k % 2 == 0 for k in conv.kernel_size):
            problems.append(f"{name}.kernel_size {tuple(conv.kernel_size)} must be odd")
        elif tuple(conv.padding) != tuple(k // 2 for k in conv.kernel_size):
            problems.append(f"{name}.padding {tuple(conv.padding)} must be kernel_size // 2 = "
                            f"{tuple(k // 2 for k in conv.kernel_size)}")
    return problems


def _read_masked(module: nn.Module, where: str) -> HetConvWeights:
    """A masked layer computes its declared pattern only if its children are the ones it built."""
    gwc, pwc, conv = module.gwc, module.pwc, _CONV_TYPES[module._dims]
    problems = []
    for name, child, kernel, padding, groups in (("gwc", gwc, module.kernel_size, module.padding, module.part),
                                                 ("pwc", pwc, (1,) * module._dims, (0,) * module._dims, 1)):
        if type(child) is not conv:
            problems.append(f"{name} is a {type(child).__name__}, expected an {conv.__name__}")
            continue
        dilation, mode = (module.dilation, module.padding_mode) if name == "gwc" else ((1,) * module._dims, "zeros")
        expected = (module.in_channels, module.out_channels, kernel, module.stride, padding, groups, dilation, mode)
        got = (child.in_channels, child.out_channels, tuple(child.kernel_size), tuple(child.stride),
               child.padding if isinstance(child.padding, str) else tuple(child.padding), child.groups,
               tuple(child.dilation), child.padding_mode)
        labels = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "groups", "dilation",
                  "padding_mode")
        problems += [f"{name}.{label} is {g}, expected {e}" for label, g, e in zip(labels, got, expected) if g != e]
    if problems:
        raise ValueError(f"{where} does not compute the HetConv it declares (part={module.part}, kernel_size="
                         f"{module.kernel_size}, stride={module.stride}): " + "; ".join(problems))
    pattern = module.pattern
    with torch.no_grad():
        dense = _dense_pointwise(pwc).masked_fill(~pattern.mask_1x1(pwc.weight.device), 0)
        weight_kxk, dense = pattern.fold(gwc.weight.detach(), dense)
        bias = None if gwc.bias is None else gwc.bias.detach().clone()
        if pwc.bias is not None:
            bias = pwc.bias.detach().clone() if bias is None else bias + pwc.bias.detach()
    return HetConvWeights(pattern, tuple(gwc.stride), weight_kxk, dense, bias, module.padding, module.dilation,
                          module.padding_mode)


def _check_published_pair(gwc: nn.Module, pwc: nn.Module, dims: int, where: str) -> None:
    problems = []
    if any(k % 2 == 0 for k in gwc.kernel_size):
        problems.append(f"gwc.kernel_size {gwc.kernel_size} must be odd")
    elif tuple(gwc.padding) != tuple(k // 2 for k in gwc.kernel_size):
        problems.append(f"gwc.padding {gwc.padding} must be kernel_size // 2 = "
                        f"{tuple(k // 2 for k in gwc.kernel_size)}")
    if gwc.in_channels % gwc.groups or gwc.out_channels % gwc.groups:
        problems.append(f"gwc.groups ({gwc.groups}) must divide its channels ({gwc.in_channels}, {gwc.out_channels})")
    if tuple(pwc.kernel_size) != (1,) * dims or tuple(pwc.padding) != (0,) * dims:
        problems.append(f"pwc must be a 1x1 convolution without padding, got kernel_size "
                        f"{pwc.kernel_size} and padding {pwc.padding}")
    if (pwc.in_channels, pwc.out_channels) != (gwc.in_channels, gwc.out_channels):
        problems.append(f"pwc maps {pwc.in_channels}->{pwc.out_channels} channels but gwc maps "
                        f"{gwc.in_channels}->{gwc.out_channels}")
    if tuple(pwc.stride) != tuple(gwc.stride):
        problems.append(f"pwc.stride {pwc.stride} differs from gwc.stride {gwc.stride}")
    for name, conv in (("gwc", gwc), ("pwc", pwc)):
        if any(d != 1 for d in conv.dilation) or conv.padding_mode != "zeros":
            problems.append(f"{name} must have dilation 1 and padding_mode 'zeros'")
        if isinstance(conv.padding, str):
            problems.append(f"{name}.padding must be numeric, got {conv.padding!r}")
    if problems:
        raise ValueError(f"{where} cannot be read as a HetConv: " + "; ".join(problems))


def _dense_pointwise(pwc: nn.Module) -> Tensor:
    """``pwc``'s weight as a full ``(N, M)`` matrix, expanding a grouped 1 x 1 convolution."""
    return dense_conv_weight(pwc).reshape(pwc.out_channels, pwc.in_channels).to(pwc.weight.dtype)


def dense_conv_weight(conv: nn.Module, kernel_size: tuple[int, ...] | None = None) -> Tensor:
    """A convolution's weight as the dense ``Tensor[N, M, *kernel_size]`` (float64) it applies.

    A grouped convolution's blocks are placed on the block diagonal; a kernel smaller than
    ``kernel_size`` (default: its own) is centred in it, which is exact when every kernel's padding
    is its own ``k // 2``.
    """
    weight = conv.weight.detach().double()
    own = tuple(conv.kernel_size)
    kernel_size = own if kernel_size is None else tuple(kernel_size)
    groups, n_out, n_in = conv.groups, conv.out_channels, conv.in_channels
    n, m = n_out // groups, n_in // groups
    window = tuple(slice((big - k) // 2, (big - k) // 2 + k) for big, k in zip(kernel_size, own))
    padded = weight.new_zeros((n_out, m) + kernel_size)
    padded[(slice(None), slice(None)) + window] = weight
    dense = weight.new_zeros((groups, n, groups, m) + kernel_size)
    index = torch.arange(groups, device=weight.device)
    dense[index, :, index] = padded.view((groups, n, m) + kernel_size)
    return dense.view((n_out, n_in) + kernel_size)


def _read_sum(module: nn.Module, convs: list[tuple[str, nn.Module]], dims: int, part: int, where: str,
              error: type) -> HetConvWeights:
    """Find the signed sum ``module`` computes of ``convs`` and fold it into one HetConv."""
    coefficients = _sum_coefficients(module, [name for name, _ in convs], convs[0][1], where, error)
    kernel = tuple(max(c.kernel_size[d] for _, c in convs) for d in range(dims))
    first = convs[0][1]
    n_out, n_in = first.out_channels, first.in_channels
    weight = first.weight
    with torch.no_grad():
        dense = torch.zeros((n_out, n_in) + kernel, dtype=torch.float64, device=weight.device)
        bias = None
        for (_, conv), coefficient in zip(convs, coefficients):
            dense += coefficient * dense_conv_weight(conv, kernel)
            if conv.bias is not None:
                term = coefficient * conv.bias.detach().double()
                bias = term if bias is None else bias + term
        pattern = HetConvPattern(n_in, n_out, part, kernel, dims)
        centre = (slice(None), slice(None)) + pattern.centre
        p, n, m = part, pattern.block_out, pattern.block_in
        index = torch.arange(p, device=weight.device)
        blocks = dense.view((p, n, p, m) + kernel)[index, :, index].reshape((n_out, m) + kernel)
        off_block = dense[centre].masked_fill(~pattern.mask_1x1(weight.device), 0)
    cast = {"dtype": weight.dtype}
    return HetConvWeights(pattern, tuple(first.stride), blocks.to(**cast), off_block.to(**cast),
                          None if bias is None else bias.to(**cast))


def _sum_coefficients(module: nn.Module, names: list[str], first: nn.Module, where: str, error: type) -> list[float]:
    """The coefficients ``a`` with ``module(x) = sum_i a_i child_i(x)``, found on a float64 probe
    (non-finite weights set to zero there: the coefficients are a matter of structure)."""
    quiet = quiet_copy(module, finite=True)
    x = probe_input(first.in_channels, tuple(first.kernel_size), first.weight.device)
    with torch.no_grad(), no_global_hooks():
        try:
            got = quiet(x)
        except Exception as failure:  # a forward that cannot even run on this input is no sum of convolutions
            raise error(f"{where}: its forward failed on a test input ({type(failure).__name__}: {failure}); "
                        "it cannot be converted exactly") from failure
        parts = [quiet.get_submodule(name)(x) for name in names]
    if not isinstance(got, Tensor) or got.shape != parts[0].shape:
        shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
        raise error(f"{where}: its forward returns {shape}, not the children's output shape "
                    f"{tuple(parts[0].shape)}; it is not a sum of {', '.join(names)}")
    basis = torch.stack([part.reshape(-1) for part in parts], 1).cpu()
    target = got.reshape(-1, 1).cpu()
    solution = torch.linalg.lstsq(basis, target, driver="gelsd").solution[:, 0]
    coefficients = [float(round(c)) if abs(c - round(c)) <= 1e-6 * max(1.0, abs(c)) else float(c)
                    for c in solution.tolist()]
    fitted = basis @ torch.tensor(coefficients, dtype=torch.float64)
    scale = float(target.norm())
    if float((fitted - target[:, 0]).norm()) > 1e-8 * max(scale, 1e-300):
        raise error(f"{where}: its forward is not a signed sum of its convolutions ({', '.join(names)}); "
                    "it cannot be converted exactly")
    return coefficients
