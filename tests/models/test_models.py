"""Tests for the model registry (every registered model) and the HetConv ResNets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparse_hetconv import MaskedHetConv2d, SparseHetConv2d, count_params, to_sparse
from sparse_hetconv.models import ResNet, create_model, list_models, register_model, resnet18, resnet34, resnet50
from sparse_hetconv.models.layers import FORMS, make_conv
from sparse_hetconv.models.resnet import BasicBlock, Bottleneck

# Smallest input (height = width) each registered model is tested at; a newly registered model
# must be added here (test_every_model_has_a_test_size says so).
TEST_SIZES = {"vgg16_cifar": 32, "resnet18": 64, "resnet34": 64, "resnet50": 64}
# Parameters of the standard (part 1) ResNets, as torchvision documents them for its ImageNet models.
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}
HETCONV = (MaskedHetConv2d, SparseHetConv2d)


def test_registry_lists_the_models():
    assert {"vgg16_cifar", "resnet18", "resnet34", "resnet50"} <= set(list_models()), list_models()
    with pytest.raises(ValueError, match=r"model \('resnet99'\) is not registered; available: .*resnet18"):
        create_model("resnet99")


def test_every_model_has_a_test_size():
    missing = sorted(set(list_models()) - set(TEST_SIZES))
    assert not missing, f"add a test input size to TEST_SIZES for {missing}"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("part", [1, 4])
@pytest.mark.parametrize("name", sorted(TEST_SIZES))
def test_every_model_trains(name, part, form):
    torch.manual_seed(0)
    model = create_model(name, part=part, form=form, num_classes=7).train()
    size = TEST_SIZES[name]
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7), f"{name}: output shape {tuple(out.shape)}"
    (out * torch.randn_like(out)).sum().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{name}(part={part}, form={form}): {pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {pname} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name}(part={part}, form={form}): {pname} got a zero gradient"
    hetconvs = [m for m in model.modules() if isinstance(m, HETCONV)]
    if part == 1:
        assert not hetconvs, f"{name}(part=1) must use standard convolutions only"
    else:
        expected = MaskedHetConv2d if form == "masked" else SparseHetConv2d
        assert hetconvs and all(type(m) is expected for m in hetconvs), f"{name}(form={form}) built another form"
        for m in hetconvs:
            if form == "masked":  # the model's own initialisation must not touch the zero diagonal
                diagonal = m.pattern.block_diagonal(m.pwc.weight.detach().view(m.out_channels, m.in_channels))
                assert not diagonal.any(), f"{name}: a masked layer was built with a non-zero block diagonal"


@pytest.mark.parametrize("name", sorted(TEST_SIZES))
def test_masked_and_sparse_compute_the_same(name):
    torch.manual_seed(0)
    masked = create_model(name, part=4, form="masked").eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the check sees every layer
        for module in masked.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    sparse = to_sparse(masked)
    x = torch.randn(2, 3, TEST_SIZES[name], TEST_SIZES[name])
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), masked(x), rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{name}: sparse and masked differ: {m}")
    assert count_params(sparse) == count_params(masked) == count_params(sparse, stored=True)


# -- ResNets --------------------------------------------------------------------------------------
@pytest.mark.parametrize("builder, blocks, three_by_three", [(resnet18, 8, 16), (resnet34, 16, 32), (resnet50, 16, 16)])
def test_resnet_every_3x3_is_hetconv(builder, blocks, three_by_three):
    model = builder(part=4, form="sparse")
    het = {name: m for name, m in model.named_modules() if isinstance(m, SparseHetConv2d)}
    convs = {name: m for name, m in model.named_modules() if type(m) is nn.Conv2d}
    assert len(het) == three_by_three, f"{builder.__name__}: {len(het)} HetConv layers, expected {three_by_three}"
    assert all(m.kernel_size == (3, 3) and m.part == 4 for m in het.values())
    left = [n for n, m in convs.items() if m.kernel_size not in ((7, 7), (1, 1))]
    assert not left, f"{builder.__name__}: standard convolutions other than the stem and 1x1 are left: {left}"
    strided = sorted(name for name, m in het.items() if m.stride == (2, 2))
    assert len(strided) == 3, f"{builder.__name__}: the stride-2 3x3 layers must be HetConv too, got {strided}"
    assert convs["conv1"].kernel_size == (7, 7) and convs["conv1"].stride == (2, 2), "the RGB stem stays standard"
    assert sum(1 for m in model.modules() if hasattr(m, "downsample") and m.downsample is not None) == (
        3 if builder is not resnet50 else 4)
    assert len([m for m in model.modules() if m.__class__.__name__ in ("BasicBlock", "Bottleneck")]) == blocks


@pytest.mark.parametrize("builder", [resnet18, resnet34, resnet50])
def test_resnet_parameters(builder):
    name = builder.__name__
    assert count_params(builder(part=1)) == TORCHVISION_PARAMS[name], f"{name}(part=1) is not the standard ResNet"
    standard, het = builder(part=1), builder(part=4, form="masked")
    # each 3x3 layer keeps M/P of its 3x3 kernels and turns the rest into 1x1 ones
    saved = sum(m.out_channels * (m.in_channels - m.in_channels // 4) * 8 for m in het.modules()
                if isinstance(m, MaskedHetConv2d))
    assert count_params(het) == count_params(standard) - saved


def test_resnet_imagenet_layout():
    model = resnet18(part=2, form="masked").eval()
    shapes = {}
    for name in ("maxpool", "layer1", "layer2", "layer3", "layer4"):
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    assert {k: tuple(v[2:]) for k, v in shapes.items()} == {
        "maxpool": (56, 56), "layer1": (56, 56), "layer2": (28, 28), "layer3": (14, 14), "layer4": (7, 7)}
    assert "layer2.0.conv1.gwc.weight" in model.state_dict(), "masked form keeps the published gwc/pwc layout"


def test_resnet_bad_arguments():
    with pytest.raises(ValueError, match=r"part \(3\) must divide 64"):
        resnet18(part=3)
    with pytest.raises(ValueError, match=r"form \('dense'\) must be one of"):
        resnet50(form="dense")
    with pytest.raises(TypeError, match="part must be an int"):
        resnet34(part=2.0)
    with pytest.raises(ValueError, match=r"num_classes \(0\)"):
        resnet18(num_classes=0)


# -- arguments ------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, error, message", [
    # a backend used to be checked only when a sparse layer was built: at part=1 or in masked form
    # any string passed
    (lambda: resnet18(part=1, backend="fastest"), ValueError, r"backend \('fastest'\) must be one of"),
    (lambda: resnet18(form="masked", backend="fastest"), ValueError, r"backend \('fastest'\) must be one of"),
    (lambda: resnet18(form=None), ValueError, r"form \(None\) must be one of \('sparse', 'masked'\)"),
    (lambda: resnet18(part=True), TypeError, r"part must be an int, got bool"),
    (lambda: resnet18(num_classes=10.0), TypeError, r"num_classes must be an int, got float"),
    (lambda: ResNet(BasicBlock, (2, 2, 2)), ValueError, r"layers \(\(2, 2, 2\)\) must be a sequence of 4 ints"),
    (lambda: ResNet(BasicBlock, (2, 0, 2, 2)), ValueError, r"layers \(0\) must be an int >= 1"),
    (lambda: ResNet("basic", (2, 2, 2, 2)), TypeError, r"block must be BasicBlock, Bottleneck or another"),
    (lambda: BasicBlock(64, 64, 0, 4, "sparse", "auto"), ValueError, r"stride \(0\) must be an int >= 1"),
    (lambda: Bottleneck(64.0, 64, 1, 4, "sparse", "auto"), TypeError, r"in_channels must be an int, got float"),
    (lambda: create_model(["resnet18"]), TypeError, r"name must be a str, got list"),
    (lambda: create_model("resnet18", parts=4), TypeError,
     r"resnet18 takes no argument 'parts'; it takes part, form, num_classes, backend"),
    (lambda: register_model("resnet18"), TypeError, r"register_model expects a named function or class, got str"),
    (lambda: make_conv(8, 8, 2, "dense"), ValueError, r"form \('dense'\) must be one of"),  # built a masked layer
    (lambda: make_conv(8, 8, 1, "sparse", bias="no"), TypeError, r"bias must be a bool, got str \('no'\)"),
    (lambda: make_conv(8, 8, 1, "sparse", kernel_size=2), ValueError, r"kernel_size \(2\) must be odd"),
    (lambda: make_conv(8, 8, 1, "sparse", stride=-1), ValueError, r"stride \(-1\) must be an int >= 1"),
])
def test_model_arguments_are_checked(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("part", [1, 2])
@pytest.mark.parametrize("form", FORMS)
def test_make_conv_takes_a_tuple_kernel_size_at_every_part(part, form):
    """Before the fix part=1 raised TypeError: unsupported operand type(s) for //: 'tuple' and 'int'."""
    conv = make_conv(4, 4, part, form, kernel_size=(3, 5))
    assert tuple(conv.kernel_size) == (3, 5)
    assert conv(torch.randn(1, 4, 7, 7)).shape == (1, 4, 7, 7), "'same' padding per dimension"


def test_registry_refuses_a_second_model_of_the_same_name():
    with pytest.raises(ValueError, match=r"a model named 'resnet18' is already registered"):
        register_model(resnet18)
    assert create_model("resnet18", part=2).conv1.out_channels == 64, "the registered resnet18 is unchanged"
