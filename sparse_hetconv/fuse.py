"""Fold BatchNorm into the HetConv (or standard) layer before it, for inference.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120. In eval mode a BatchNorm is
an affine map per channel, ``y = s (z - mean) + beta`` with ``s = gamma / sqrt(var + eps)``. When
``z`` is a HetConv's output, scaling filter ``j``'s k x k kernels *and* its 1 x 1 kernels by
``s[j]`` and setting the bias to ``s (bias - mean) + beta`` gives the same ``y`` in one layer: the
pass over the activations that the BatchNorm costs disappears. Both parts are scaled, so the
folded layer is still a HetConv of the same pattern (the masked form's zero block diagonal stays
zero). The same folding is applied to standard convolutions and to ``Linear`` + ``BatchNorm1d``.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .masked import _MaskedHetConvNd
from .sparse import _SparseHetConvNd

__all__ = ["fuse_bn"]

_BN_FOR = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` in float64 with ``bn(z) = s z + t`` in eval mode."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def _conv_dims(module: nn.Module) -> int | None:
    """Spatial dimensions of a foldable layer (None if ``module`` is not one)."""
    if isinstance(module, (_SparseHetConvNd, _MaskedHetConvNd)):
        return module._dims
    if type(module) in (nn.Conv2d, nn.Conv3d):
        return module.weight.dim() - 2
    if type(module) is nn.Linear:
        return 0
    return None


def _fits(module: nn.Module, bn: nn.Module) -> bool:
    dims = _conv_dims(module)
    if dims is None:
        return False
    expected = nn.BatchNorm1d if dims == 0 else _BN_FOR.get(dims)
    channels = module.out_features if dims == 0 else module.out_channels
    return (type(bn) is expected and bn.running_mean is not None and bn.running_var is not None
            and bn.num_features == channels)


def _scaled(param: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (param.dim() - 1)
    return (param.double() * scale.view(shape)).to(param.dtype)


def _new_bias(old: torch.Tensor | None, scale, shift, like: torch.Tensor) -> nn.Parameter:
    base = old.double() if old is not None else torch.zeros_like(shift)
    return nn.Parameter((base * scale + shift).to(device=like.device, dtype=like.dtype))


def _fold(module: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` into ``module`` in place."""
    scale, shift = _scale_shift(bn)
    with torch.no_grad():
        if isinstance(module, _SparseHetConvNd):
            scale, shift = scale.to(module.weight_kxk.device), shift.to(module.weight_kxk.device)
            module.weight_kxk.copy_(_scaled(module.weight_kxk, scale))
            if module.weight_1x1 is not None:
                module.weight_1x1.copy_(_scaled(module.weight_1x1, scale))
            module.bias = _new_bias(module.bias, scale, shift, module.weight_kxk)
        elif isinstance(module, _MaskedHetConvNd):
            scale, shift = scale.to(module.gwc.weight.device), shift.to(module.gwc.weight.device)
            module.gwc.weight.copy_(_scaled(module.gwc.weight, scale))
            module.pwc.weight.copy_(_scaled(module.pwc.weight, scale))
            bias = module.gwc.bias
            if module.pwc.bias is not None:  # a published-style pair with two biases: sum them
                bias = module.pwc.bias if bias is None else bias + module.pwc.bias
                module.pwc.bias = None
            module.gwc.bias = _new_bias(bias, scale, shift, module.gwc.weight)
        else:  # nn.Conv2d, nn.Conv3d, nn.Linear
            scale, shift = scale.to(module.weight.device), shift.to(module.weight.device)
            module.weight.copy_(_scaled(module.weight, scale))
            module.bias = _new_bias(module.bias, scale, shift, module.weight)


def fuse_bn(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution into it, for inference.

    Pairs are found inside ``nn.Sequential`` containers (a layer immediately followed by its
    BatchNorm, as in :func:`sparse_hetconv.models.vgg16_cifar`): :class:`SparseHetConv2d` /
    ``3d`` and :class:`MaskedHetConv2d` / ``3d`` (both parts scaled, the bias created if needed),
    ``nn.Conv2d`` / ``nn.Conv3d`` (any groups) with ``BatchNorm2d`` / ``3d``, and ``nn.Linear``
    with ``BatchNorm1d``. Each folded BatchNorm is replaced by ``nn.Identity`` (module names and
    indices are kept). The result computes what the model computed in eval mode, up to rounding
    (the arithmetic is done in float64); BatchNorm statistics are gone, so it is for inference
    only: training it again would not update them.

    Args:
        model (nn.Module): the model, in eval mode.
        inplace (bool): change ``model`` itself instead of a deep copy.

    Returns:
        nn.Module: the fused model (in eval mode).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``inplace`` not a bool.
        ValueError: ``model`` is in training mode (folding uses the running statistics, which is
            only what the model computes in eval mode).

    Example:
        >>> model = vgg16_cifar(part=4).eval()
        >>> fused = fuse_bn(model)
        >>> sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
        0
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f"fuse_bn folds BatchNorm running statistics, which is what the model computes in "
                         f"eval mode, but {len(training)} module(s) are in training mode (first: "
                         f"'{training[0]}'); call model.eval() first")
    if not inplace:
        model = copy.deepcopy(model)
    fused = 0
    for container in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(container._modules)
        for first, second in zip(names, names[1:]):
            layer, bn = container._modules[first], container._modules[second]
            if layer is not None and bn is not None and _fits(layer, bn):
                _fold(layer, bn)
                container._modules[second] = nn.Identity()
                fused += 1
    if not fused:
        warnings.warn("fuse_bn: no BatchNorm directly follows a convolution or linear layer inside an "
                      "nn.Sequential; returned the model unchanged", stacklevel=2)
    return model
