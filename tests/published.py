"""The public HetConv implementations' modules, written the way their authors write them.

Tests convert these with the library and compare outputs; nothing here imports the library, so a
bug in the library cannot hide in its own reference. (The benchmark's timing reference lives in
``benchmarks.harness.published``; it also masks gradients the published way.)
"""

from __future__ import annotations

import torch
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


# -- sxpro/HetConvolution2d_pytorch (HetConv.py): class names, attribute names and forward as there.
# Their HetConv2d.__init__ calls super(HetConv2d_v2, self).__init__() (a typo that raises TypeError);
# here it calls its own parent, which is what the class evidently means.
class Efficient_HetConv2d(nn.Module):  # noqa: N801 - the published name
    """sxpro's "efficient" form: a grouped 3x3 plus a full 1x1 minus a grouped 1x1, all with bias."""

    def __init__(self, in_feats, out_feats, p=4):
        super().__init__()
        if in_feats % p != 0:
            raise ValueError("in_channels must be divisible by p")
        if out_feats % p != 0:
            raise ValueError("out_channels must be divisible by p")
        self.conv3x3 = nn.Conv2d(in_feats, out_feats, kernel_size=3, padding=1, groups=p)
        self.conv1x1_ = nn.Conv2d(in_feats, out_feats, kernel_size=1, groups=p)
        self.conv1x1 = nn.Conv2d(in_feats, out_feats, kernel_size=1)

    def forward(self, x):
        return self.conv3x3(x) + self.conv1x1(x) - self.conv1x1_(x)


class HetConv2d(nn.Module):
    """sxpro's per-kernel form in the paper's shifted pattern: one 1-channel convolution per
    (filter, channel), 3x3 where ``(channel - filter) % p == 0``, each with a bias."""

    def __init__(self, in_feats, out_feats, groups=1, p=2):
        super().__init__()
        if in_feats % groups != 0:
            raise ValueError("in_channels must be divisible by groups")
        self.in_feats = in_feats
        self.out_feats = out_feats
        self.groups = groups
        self.blocks = nn.ModuleList()
        for i in range(out_feats):
            self.blocks.append(self.make_HetConv2d(i, p))

    def make_HetConv2d(self, n, p):  # noqa: N802 - the published name
        layers = nn.ModuleList()
        for i in range(self.in_feats):
            if ((i - n) % (p)) == 0:
                layers.append(nn.Conv2d(1, 1, 3, 1, 1))
            else:
                layers.append(nn.Conv2d(1, 1, 1, 1, 0))
        return layers

    def forward(self, x):
        out = []
        for i in range(0, self.out_feats):
            out_ = self.blocks[i][0](x[:, 0:1, :, :])
            for j in range(1, self.in_feats):
                out_ += self.blocks[i][j](x[:, j:j + 1, :, :])
            out.append(out_)
        return torch.cat(out, 1)


class HetConv2d_v2(nn.Module):  # noqa: N801 - the published name
    """sxpro's per-filter form in the shifted pattern: per filter one 3x3 convolution over the
    channels with ``(channel - filter) % p == 0`` and one 1x1 over the others, both with bias."""

    def __init__(self, in_feats, out_feats, p=4, groups=1):
        super().__init__()
        if in_feats % groups != 0:
            raise ValueError("in_channels must be divisible by groups")
        self.p = p
        self.in_feats = in_feats
        self.out_feats = out_feats
        self.groups = groups
        self.blocks = nn.ModuleList()
        for i in range(out_feats):
            self.blocks.append(self.make_HetConv2d(p))

    def make_HetConv2d(self, p):  # noqa: N802 - the published name
        layers = nn.ModuleList()
        layers.append(nn.Conv2d(self.in_feats // p, 1, 3, 1, 1))
        layers.append(nn.Conv2d(self.in_feats - self.in_feats // p, 1, 1, 1, 0))
        return layers

    def forward(self, x):
        out = []
        for i in range(0, self.out_feats):
            out1x1 = torch.zeros([0])
            out3x3 = torch.zeros([0])
            for j in range(0, self.in_feats):
                if ((j - i) % (self.p)) == 0:
                    if out3x3.shape[0] == 0:
                        out3x3 = x[:, j:j + 1, :, :]
                    else:
                        out3x3 = torch.cat((out3x3, x[:, j:j + 1, :, :]), 1)
                else:
                    if out1x1.shape[0] == 0:
                        out1x1 = x[:, j:j + 1, :, :]
                    else:
                        out1x1 = torch.cat((out1x1, x[:, j:j + 1, :, :]), 1)
            out3x3 = self.blocks[i][0](out3x3)
            out1x1 = self.blocks[i][1](out1x1)
            out_ = out1x1 + out3x3
            out.append(out_)
        return torch.cat(out, 1)


class SxproVGG(nn.Module):
    """A VGG-style chain of one sxpro layer type (sxpro ships layers only): RGB stem conv, then
    ``layer(in, out, p)`` + BatchNorm + ReLU per entry of ``cfg``, pooling at "M", then
    ``x.view(x.size(0), -1)`` into a Linear head over ``spatial`` pixels per channel."""

    def __init__(self, layer, cfg, p, num_classes=10, spatial=1):
        super().__init__()
        layers = [nn.Conv2d(3, cfg[0], 3, padding=1), nn.BatchNorm2d(cfg[0]), nn.ReLU(inplace=True)]
        in_channels = cfg[0]
        for v in cfg[1:]:
            if v == "M":
                layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
            else:
                layers += [layer(in_channels, v, p=p), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                in_channels = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels * spatial, num_classes)

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


def sxpro_vgg(layer="HetConv2d_v2", cfg=(8, "M", 8, "M", 16, 16, "M"), p=4, num_classes=10, spatial=1):
    """A factory for the command line: :class:`SxproVGG` with the sxpro layer named ``layer``."""
    return SxproVGG({"HetConv2d": HetConv2d, "HetConv2d_v2": HetConv2d_v2}[layer], list(cfg), p, num_classes, spatial)


# -- zhang943/Approximate-HetConv (HetConv.py, vgg.py): module names, keys and cfg lists as there.
class HetConv(nn.Module):
    """zhang943's HetConv: gwc (grouped 3x3) + pwc (full 1x1, never masked), no bias."""

    def __init__(self, in_channels, out_channels, p):
        super().__init__()
        self.gwc = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, groups=p, bias=False)
        self.pwc = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, x):
        return self.gwc(x) + self.pwc(x)


ZHANG_CFG = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """zhang943's VGG: ``features`` from make_layers, ``classifier`` Linear-BatchNorm1d-Linear
    (10 classes whatever ``num_classes`` says, as there)."""

    def __init__(self, features, num_classes=1000, init_weights=True):
        super().__init__()
        self.features = features
        self.classifier = nn.Sequential(nn.Linear(512 * 1 * 1, 512), nn.BatchNorm1d(512), nn.Linear(512, 10))

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        x = self.classifier(x)
        return x


def make_layers(cfg, batch_norm=False, p=2, width=1):
    """zhang943's make_layers; ``width`` (not theirs) divides the channels to keep tests small."""
    layers = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            v = v // width
            if in_channels == 3:
                conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            elif p == 1:
                conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            else:
                conv2d = HetConv(in_channels, v, p=p)
            if batch_norm:
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


def zhang_vgg(cfg="D", p=4, batch_norm=True, width=1):
    """``vgg16_bn(p=...)`` (cfg "D"), VGG-11 ("A") or VGG-19 ("E") of zhang943, ``width`` times
    narrower (the classifier then reads 512 // width features)."""
    model = VGG(make_layers(ZHANG_CFG[cfg], batch_norm=batch_norm, p=p, width=width))
    if width != 1:
        model.classifier[0] = nn.Linear(512 // width, 512 // width)
        model.classifier[1] = nn.BatchNorm1d(512 // width)
        model.classifier[2] = nn.Linear(512 // width, 10)
    return model


def train_briefly(model, input_shape, steps=3, seed=0, lr=0.05, mask_grads=None):
    """A few SGD steps (momentum 0.9, weight decay 5e-4, as the published scripts train) on random
    data, so that converted weights are trained ones, not an initialisation; returns the model in
    eval mode. ``mask_grads(model)`` runs after each backward (the naive masked implementation)."""
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(steps):
        x = torch.randn(input_shape, generator=generator, dtype=dtype)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        if mask_grads is not None:
            mask_grads(model)
        optimizer.step()
    return model.eval()
