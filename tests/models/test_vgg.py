"""The published VGG-16 for CIFAR-10: layout, keys of the published script, forms, P = 1."""

import pytest
import torch
from torch import nn

from helpers import assert_close
from published import PublishedVGG
from sparse_hetconv import MaskedHetConv2d, SparseHetConv2d, to_sparse
from sparse_hetconv.models import VGG, create_model, list_models, vgg16_cifar

HETCONV_INDICES = [3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]
CHANNELS = [(64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 512),
            (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]


def test_masked_layout_and_keys():
    model = vgg16_cifar(part=4, form="masked")
    feats = model.features
    assert len(feats) == 44
    first = feats[0]
    assert isinstance(first, nn.Conv2d) and first.bias is not None and (first.in_channels, first.out_channels) == (3, 64)
    assert isinstance(feats[1], nn.BatchNorm2d) and isinstance(feats[2], nn.ReLU)
    assert [i for i, m in enumerate(feats) if isinstance(m, MaskedHetConv2d)] == HETCONV_INDICES
    assert [(feats[i].in_channels, feats[i].out_channels) for i in HETCONV_INDICES] == CHANNELS
    assert [i for i, m in enumerate(feats) if isinstance(m, nn.MaxPool2d)] == [6, 13, 23, 33, 43]
    keys = model.state_dict().keys()
    for i in HETCONV_INDICES:
        assert f"features.{i}.gwc.weight" in keys and f"features.{i}.pwc.weight" in keys
        assert f"features.{i}.gwc.bias" not in keys, "the HetConv layers have no bias"
    cls = model.classifier
    assert [type(m) for m in cls] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (cls[0].in_features, cls[0].out_features, cls[3].out_features) == (512, 512, 10)


@pytest.mark.parametrize("part", [2, 4])
def test_published_script_checkpoint_loads_and_matches(part):
    torch.manual_seed(0)
    published = PublishedVGG(part).eval()
    ours = vgg16_cifar(part=part, form="masked").eval()
    assert published.state_dict().keys() == ours.state_dict().keys(), "keys must match the published script"
    with torch.no_grad():  # the published loop keeps the pwc block diagonal at zero
        for i in HETCONV_INDICES:
            pwc = published.features[i].pwc.weight
            pwc.view(pwc.shape[0], -1).mul_(ours.features[i].pattern.mask_1x1())
    ours.load_state_dict(published.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert_close(ours(x), published(x), "our masked VGG vs the published one", rtol=1e-4, atol=1e-5)
    assert_close(to_sparse(ours)(x), published(x), "sparse VGG vs the published one", rtol=1e-4, atol=1e-5)


def test_sparse_form_and_parameter_savings():
    masked, sparse = vgg16_cifar(part=4, form="masked"), vgg16_cifar(part=4, form="sparse")
    assert all(isinstance(sparse.features[i], SparseHetConv2d) for i in HETCONV_INDICES)
    wasted = sum(n * m // 4 for m, n in CHANNELS)
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(masked) - count(sparse) == wasted, "sparse form stores exactly N*M/P fewer weights per layer"
    assert masked.state_dict().keys() != sparse.state_dict().keys()


def test_part_one_is_standard_vgg():
    model = vgg16_cifar(part=1, form="sparse")
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and not any(isinstance(m, (SparseHetConv2d, MaskedHetConv2d)) for m in model.modules())
    assert all(c.bias is None for c in convs[1:])


@pytest.mark.parametrize("form", ["sparse", "masked"])
def test_forward_backward_and_num_classes(form):
    model = vgg16_cifar(part=8, form=form, num_classes=7)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters()), "every parameter should get a gradient"


def test_registry():
    assert "vgg16_cifar" in list_models()
    assert isinstance(create_model("vgg16_cifar", part=2, form="masked").features[3], MaskedHetConv2d)
    with pytest.raises(ValueError, match=r"model \('vgg19'\) is not registered; available: .*vgg16_cifar"):
        create_model("vgg19")


@pytest.mark.parametrize("kwargs, message", [
    (dict(part=3), r"in_channels \(64\) must be divisible by part \(3\)"),
    (dict(form="dense"), r"form \('dense'\) must be one of \('sparse', 'masked'\)"),
    (dict(part=0), r"part \(0\) must be an int >= 1"),
    (dict(num_classes=0), r"num_classes \(0\) must be an int >= 1"),
    (dict(part=1, backend="fastest"), r"backend \('fastest'\) must be one of"),  # no layer used to check it
    (dict(form="masked", backend="fastest"), r"backend \('fastest'\) must be one of"),
    (dict(memory_format="nhwc"), r"memory_format \('nhwc'\) must be torch.channels_last"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vgg16_cifar(**kwargs)


@pytest.mark.parametrize("config, error, message", [
    ([], ValueError, r"config \(\(\)\) must start with a convolution"),  # built a model that failed in forward
    (["M", 64], ValueError, r"must start with a convolution"),
    ([64, 0, "M"], ValueError, r"config \(\[64, 0, 'M'\]\) must hold channel counts \(ints >= 1\) and 'M'.*got 0"),
    ([64, "pool"], ValueError, r"got 'pool'"),
    ("64M", TypeError, r"config must be a sequence of channel counts and 'M', got str"),
])
def test_bad_config(config, error, message):
    with pytest.raises(error, match=message):
        VGG(config)


def test_small_config_builds_and_runs():
    model = VGG((16, "M", 32, "M"), part=2, num_classes=3, memory_format=None)
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 3)
