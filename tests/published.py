"""The public HetConv implementations' modules, written the way their authors write them.

Tests convert these with the library and compare outputs; nothing here imports the library, so a
bug in the library cannot hide in its own reference. (The benchmark's timing reference lives in
``sparse_hetconv.profiling.bench.published``; it also masks gradients the published way.)
"""

from __future__ import annotations

from torch import nn

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class PublishedHetConv(nn.Module):
    """The published "efficient" HetConv (irvinxav's VGG-16 script): ``gwc(x) + pwc(x)``, gwc a
    grouped 3x3 convolution and pwc a full 1x1 convolution; the mask lives in the training loop."""

    def __init__(self, in_channels, out_channels, p, stride=1, kernel_size=3, bias=False, pwc_groups=1):
        super().__init__()
        self.gwc = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=p, bias=bias)
        self.pwc = nn.Conv2d(in_channels, out_channels, 1, stride, groups=pwc_groups, bias=bias)

    def forward(self, x):
        return self.gwc(x) + self.pwc(x)


class PublishedVGG(nn.Module):
    """The published script's VGG-16 for CIFAR-10 (module names and keys as there)."""

    def __init__(self, part):
        super().__init__()
        layers, in_channels = [], 3
        for i, v in enumerate(VGG16_CFG):
            if v == "M":
                layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
            elif i == 0:
                layers += [nn.Conv2d(3, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers += [PublishedHetConv(in_channels, v, part), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            if v != "M":
                in_channels = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                                        nn.Linear(512, 10))

    def forward(self, x):
        return self.classifier(self.features(x).view(x.size(0), -1))
