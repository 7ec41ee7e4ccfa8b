"""VGG-16 for CIFAR-10 as in the HetConv paper's published code.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120 (Table 1: VGG-16 on CIFAR-10).
The first (RGB) convolution stays standard, as in the paper; the other twelve are HetConv layers.
In masked form the state_dict keys are those of the published script, so its checkpoints load.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._checks import check_int
from .._memory_format import apply_memory_format, check_memory_format
from ..backends import check_backend
from ._registry import register_model
from .layers import check_form, make_conv

__all__ = ["VGG", "vgg16_cifar", "VGG16_CONFIG"]

# Channels of each 3x3 convolution, "M" a 2x2 max-pool (architectures are data).
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG with BatchNorm for 32x32 inputs: ``features`` -> flatten -> ``classifier``.

    Args:
        config (sequence): channels per convolution and ``"M"`` for a max-pool.
        part (int): HetConv ``P`` of every convolution but the first; 1 gives standard ones.
        form (str): ``"sparse"`` or ``"masked"``.
        num_classes (int): outputs of the classifier.
        backend (str): ``backend`` of the sparse layers.
        memory_format (torch.memory_format or None): layout of the 4-D parameters;
            ``torch.channels_last`` (default) makes every activation channels-last, the fast
            layout of oneDNN's convolutions; None keeps PyTorch's NCHW default.

    Raises:
        TypeError / ValueError: an argument of the wrong type or value, a ``config`` that is not
            a sequence of channel counts and ``"M"`` starting with a convolution, or a ``part``
            that does not divide a HetConv layer's channels (the message names the argument).
    """

    def __init__(self, config=VGG16_CONFIG, part: int = 4, form: str = "sparse", num_classes: int = 10,
                 backend: str = "auto", memory_format=torch.channels_last) -> None:
        super().__init__()
        _check_config(config)
        check_int("part", part)
        check_int("num_classes", num_classes)
        check_form(form)
        check_backend(backend)
        check_memory_format(memory_format)
        layers: list[nn.Module] = []
        in_channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            if in_channels == 3:  # the RGB stem stays a standard convolution, with a bias
                conv = nn.Conv2d(3, item, 3, padding=1)
            else:
                conv = make_conv(in_channels, item, part, form, backend=backend)
            layers += [conv, nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
            in_channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(in_channels, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Linear(512, num_classes)
        )
        apply_memory_format(self, memory_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _check_config(config: object) -> None:
    if isinstance(config, (str, bytes)) or not isinstance(config, Sequence):
        raise TypeError(f"config must be a sequence of channel counts and 'M', got {type(config).__name__} "
                        f"({config!r})")
    for item in config:
        if item != "M" and (isinstance(item, bool) or not isinstance(item, int) or item < 1):
            raise ValueError(f"config ({config!r}) must hold channel counts (ints >= 1) and 'M' (a max-pool), "
                             f"got {item!r}")
    if not config or config[0] == "M":
        raise ValueError(f"config ({tuple(config)!r}) must start with a convolution (a channel count)")


@register_model
def vgg16_cifar(part: int = 4, form: str = "sparse", num_classes: int = 10, backend: str = "auto",
                memory_format=torch.channels_last) -> VGG:
    """The published VGG-16 for CIFAR-10 (32x32 inputs) with HetConv layers of part ``part``.

    Thirteen 3x3 convolutions (64, 64, pool, 128, 128, pool, 256 x3, pool, 512 x3, pool, 512 x3,
    pool), each followed by BatchNorm2d and ReLU; the first is a standard ``Conv2d(3, 64, 3,
    padding=1)`` with a bias, the others HetConv without bias (standard convolutions for
    ``part=1``); classifier ``Linear(512, 512), BatchNorm1d, ReLU, Linear(512, num_classes)``.
    In masked form the HetConv layers are ``features.3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40``
    with keys ``features.3.gwc.weight`` and ``features.3.pwc.weight``, as in the published script.
    Parameters are channels-last unless ``memory_format=None`` (see :class:`VGG`).

    Example:
        >>> model = vgg16_cifar(part=4, form="sparse")
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return VGG(VGG16_CONFIG, part, form, num_classes, backend, memory_format)
