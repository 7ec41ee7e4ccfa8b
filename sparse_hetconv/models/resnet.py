"""ResNet-18/34/50 in the ImageNet layout with HetConv in place of every 3x3 convolution.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120 (Table 5: ResNet on ImageNet).
The layout is He et al.'s ImageNet ResNet (224x224 inputs; the stride of a bottleneck stage sits
on its 3x3 convolution, as in torchvision's "v1.5"). Every 3x3 convolution becomes a HetConv
layer, the stride-2 ones included; the 7x7 RGB stem, the 1x1 convolutions (bottleneck ends and
shortcut projections) and the classifier stay standard. ``part=1`` gives the plain ResNet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._base import _HetConvBase
from .._checks import check_int
from ..backends import check_backend
from ._registry import register_model
from .layers import check_form, make_conv

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50"]

STAGE_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """Two 3x3 HetConv layers with BatchNorm and an identity (or 1x1 projection) shortcut.

    Args:
        in_channels (int): input channels.
        width (int): channels of both 3x3 layers (the output has ``width * expansion``).
        stride (int): stride of the first 3x3 layer and of the shortcut.
        part (int), form (str), backend (str): passed to :func:`make_conv`.

    Shape:
        input (Tensor[batch, in_channels, H, W]) -> Tensor[batch, width, ceil(H/s), ceil(W/s)]
    """

    expansion = 1
    # (layer, its BatchNorm) pairs whose BatchNorm is the layer's only user, for fuse_bn
    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(self, in_channels: int, width: int, stride: int, part: int, form: str, backend: str) -> None:
        super().__init__()
        _check_block(in_channels, width, stride)
        self.conv1 = make_conv(in_channels, width, part, form, stride=stride, backend=backend)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = make_conv(width, width, part, form, backend=backend)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, width * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 HetConv (carrying the stride), 1x1 expand (x4), each with BatchNorm.

    Args: as :class:`BasicBlock`; the output has ``4 * width`` channels.
    """

    expansion = 4
    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, in_channels: int, width: int, stride: int, part: int, form: str, backend: str) -> None:
        super().__init__()
        _check_block(in_channels, width, stride)
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = make_conv(width, width, part, form, stride=stride, backend=backend)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _check_block(in_channels: object, width: object, stride: object) -> None:
    check_int("in_channels", in_channels)
    check_int("width", width)
    check_int("stride", stride)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))


class ResNet(nn.Module):
    """ImageNet ResNet: 7x7/2 stem, 3x3/2 max-pool, four stages, global average pool, ``fc``.

    Args:
        block (type): :class:`BasicBlock` or :class:`Bottleneck`.
        layers (sequence of 4 ints): blocks per stage.
        part (int): HetConv ``P`` of every 3x3 convolution; 1 gives standard ones. Must divide
            64 (the narrowest 3x3 layer).
        form (str): ``"sparse"`` or ``"masked"``.
        num_classes (int): outputs of ``fc``.
        backend (str): ``backend`` of the sparse layers.

    Shape:
        input (Tensor[batch, 3, H, W]) -> Tensor[batch, num_classes]; built for 224x224, any
        ``H, W >= 32`` runs (the pool before ``fc`` is adaptive).

    Raises:
        TypeError / ValueError: an argument of the wrong type or value (the message names it).
    """

    conv_bn_pairs = (("conv1", "bn1"),)

    def __init__(self, block, layers, part: int = 4, form: str = "sparse", num_classes: int = 1000,
                 backend: str = "auto") -> None:
        super().__init__()
        if not (isinstance(block, type) and issubclass(block, nn.Module)
                and isinstance(getattr(block, "expansion", None), int)):
            raise TypeError(f"block must be BasicBlock, Bottleneck or another nn.Module class with an int "
                            f"'expansion', got {block!r}")
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or len(layers) != len(STAGE_WIDTHS):
            raise ValueError(f"layers ({layers!r}) must be a sequence of {len(STAGE_WIDTHS)} ints: blocks per stage")
        for count in layers:
            check_int("layers", count)
        check_int("part", part)
        check_int("num_classes", num_classes)
        check_form(form)
        check_backend(backend)
        if STAGE_WIDTHS[0] % part:
            raise ValueError(f"part ({part}) must divide {STAGE_WIDTHS[0]}, the channels of the narrowest "
                             "3x3 layer of a ResNet")
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels = 64
        for index, (width, blocks) in enumerate(zip(STAGE_WIDTHS, layers)):
            stage = []
            for b in range(blocks):
                stride = 2 if index > 0 and b == 0 else 1
                stage.append(block(in_channels, width, stride, part, form, backend))
                in_channels = width * block.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        # He initialisation for the standard convolutions; HetConv layers (and the masked form's
        # gwc / pwc children, whose block diagonal must stay zero) keep their own.
        inside = {id(child) for module in self.modules() if isinstance(module, _HetConvBase)
                  for child in module.modules()}
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and id(module) not in inside:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model
def resnet18(part: int = 4, form: str = "sparse", num_classes: int = 1000, backend: str = "auto") -> ResNet:
    """ResNet-18 (basic blocks ``[2, 2, 2, 2]``) with HetConv 3x3 layers of part ``part``.

    Example:
        >>> resnet18(part=4)(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 1000])
    """
    return ResNet(BasicBlock, (2, 2, 2, 2), part, form, num_classes, backend)


@register_model
def resnet34(part: int = 4, form: str = "sparse", num_classes: int = 1000, backend: str = "auto") -> ResNet:
    """ResNet-34 (basic blocks ``[3, 4, 6, 3]``) with HetConv 3x3 layers of part ``part``."""
    return ResNet(BasicBlock, (3, 4, 6, 3), part, form, num_classes, backend)


@register_model
def resnet50(part: int = 4, form: str = "sparse", num_classes: int = 1000, backend: str = "auto") -> ResNet:
    """ResNet-50 (bottleneck blocks ``[3, 4, 6, 3]``, stride on the 3x3) with HetConv 3x3 layers."""
    return ResNet(Bottleneck, (3, 4, 6, 3), part, form, num_classes, backend)
