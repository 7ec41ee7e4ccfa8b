"""fuse_bn: BatchNorm folded into the layer before it, exactly, for every supported layer type and
every Conv -> BatchNorm pair of a model (fx data flow, or the module tree where fx cannot trace)."""

import copy
import warnings

import pytest
import torch
from torch import nn

from helpers import assert_close
from sparse_hetconv import (ConversionReport, MaskedHetConv2d, MaskedHetConv3d, SparseHetConv2d, SparseHetConv3d,
                            fuse_bn)
from sparse_hetconv.batchnorm import FuseReport, _Tracer
from sparse_hetconv.models import resnet18, vgg16_cifar

BATCHNORMS = nn.modules.batchnorm._BatchNorm


def _random_bn(bn: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.2)
        if bn.affine:
            bn.weight.copy_(torch.randn(bn.num_features, generator=generator))
            bn.bias.copy_(torch.randn(bn.num_features, generator=generator))
    return bn


LAYERS = {
    "sparse2d": lambda bias: SparseHetConv2d(8, 12, 4, stride=2, bias=bias, dtype=torch.float64),
    "masked2d": lambda bias: MaskedHetConv2d(8, 12, 4, kernel_size=5, bias=bias, dtype=torch.float64),
    "conv2d": lambda bias: nn.Conv2d(8, 12, 3, padding=1, groups=2, bias=bias, dtype=torch.float64),
    "sparse3d": lambda bias: SparseHetConv3d(4, 6, 2, bias=bias, dtype=torch.float64),
    "masked3d": lambda bias: MaskedHetConv3d(4, 6, 2, bias=bias, dtype=torch.float64),
    "linear": lambda bias: nn.Linear(8, 12, bias=bias, dtype=torch.float64),
    "conv1d": lambda bias: nn.Conv1d(8, 12, 3, padding=1, bias=bias, dtype=torch.float64),
}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_fused_layer_computes_what_layer_and_batchnorm_computed(kind, bias, affine):
    torch.manual_seed(0)
    layer = LAYERS[kind](bias)
    dims = 0 if kind == "linear" else int(kind[-2])
    bn_type = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    model = nn.Sequential(layer, _random_bn(bn_type(12 if dims != 3 else 6, affine=affine, dtype=torch.float64), 1),
                          nn.ReLU()).eval()
    shape = {0: (5, 8), 1: (2, 8, 9), 2: (2, 8, 9, 7), 3: (2, 4, 5, 4, 6)}[dims]
    x = torch.randn(shape, dtype=torch.float64)
    fused = fuse_bn(model)
    assert isinstance(fused[1], nn.Identity), "the BatchNorm should be replaced by nn.Identity"
    assert_close(fused(x), model(x), f"fuse_bn {kind} bias={bias} affine={affine}", rtol=1e-10, atol=1e-12)
    assert isinstance(model[1], nn.modules.batchnorm._BatchNorm), "the input model must be left untouched"


def test_masked_layer_keeps_a_zero_block_diagonal():
    torch.manual_seed(0)
    model = nn.Sequential(MaskedHetConv2d(8, 8, 4), _random_bn(nn.BatchNorm2d(8), 2)).eval()
    layer = fuse_bn(model)[0]
    dense = layer.pwc.weight.reshape(8, 8)
    assert torch.equal(dense[~layer.pattern.mask_1x1()], torch.zeros(16)), "diagonal must stay zero"


def _random_model(build) -> nn.Module:
    torch.manual_seed(0)
    model = build().double()
    for i, m in enumerate(model.modules()):
        if isinstance(m, BATCHNORMS):
            _random_bn(m, i)
    return model.eval()


MODELS = {
    "vgg16_cifar-sparse": (lambda: vgg16_cifar(part=4, form="sparse"), 14, 32),
    "vgg16_cifar-masked": (lambda: vgg16_cifar(part=4, form="masked"), 14, 32),
    # 3 of resnet18's 20 BatchNorms sit in an nn.Sequential: the rest used to be left silently
    "resnet18-sparse": (lambda: resnet18(part=4, form="sparse", num_classes=10), 20, 32),
    "resnet18-masked": (lambda: resnet18(part=2, form="masked", num_classes=10), 20, 32),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_whole_model_folds_every_batchnorm_and_computes_what_it_computed(name):
    build, count, size = MODELS[name]
    model = _random_model(build)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left, so nothing to warn about
        fused, report = fuse_bn(model, return_report=True)
    left = [path for path, m in fused.named_modules() if isinstance(m, BATCHNORMS)]
    assert not left, f"{name}: BatchNorm modules were not folded: {left}"
    assert len(report.replaced) == count and not report.skipped, f"{name}: {report}"
    assert not report.untraced, f"{name}: fx should trace the registered models: {report.untraced}"
    with torch.no_grad():
        assert_close(fused(x), model(x), f"{name} fused", rtol=1e-9, atol=1e-10)
    assert report.params_after < report.params_before, "BatchNorm parameters are gone"


def test_report_says_what_was_folded_into_what():
    fused, report = fuse_bn(_random_model(lambda: resnet18(part=4, num_classes=10)), return_report=True)
    assert isinstance(report, FuseReport) and isinstance(report, ConversionReport) and report.converter == "fuse_bn"
    assert report.folded_into["bn1"] == "conv1"
    assert report.folded_into["layer1.0.bn2"] == "layer1.0.conv2"
    assert report.folded_into["layer2.0.downsample.1"] == "layer2.0.downsample.0"
    assert report.replaced[:3] == ["bn1", "layer1.0.bn1", "layer1.0.bn2"], "in module order"
    text = str(report)
    assert text.startswith("fuse_bn: folded 20 BatchNorm layers, left 0"), text
    assert "folded layer4.1.bn2 into layer4.1.conv2" in text, text


@pytest.mark.parametrize("name", ["vgg16_cifar-masked", "resnet18-sparse"])
def test_fusing_a_fused_model_changes_nothing(name):
    fused = fuse_bn(_random_model(MODELS[name][0]))
    identities = [m for m in fused.modules() if isinstance(m, nn.Identity)]
    assert identities and not any(m.training for m in identities), "Identity modules must be in eval mode"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, report = fuse_bn(fused, return_report=True)  # used to fail: the Identity modules were in train mode
    assert not report.replaced and not report.skipped, str(report)
    before, after = fused.state_dict(), again.state_dict()
    assert before.keys() == after.keys(), "fusing again changed the modules"
    for key in before:
        assert torch.equal(before[key], after[key]), f"fusing again changed {key}"


def test_without_fx_the_module_tree_of_the_registered_models_is_used(monkeypatch):
    def untraceable(self, root, *args, **kwargs):
        raise RuntimeError("tracing disabled by the test")

    monkeypatch.setattr(_Tracer, "trace", untraceable)
    model = _random_model(lambda: resnet18(part=4, num_classes=10))
    fused, report = fuse_bn(model, return_report=True)
    assert len(report.replaced) == 20 and not report.skipped, str(report)
    assert report.untraced[""] == "RuntimeError: tracing disabled by the test", report.untraced
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_close(fused(x), model(x), "resnet18 fused from its module tree", rtol=1e-9, atol=1e-10)


class _Residual(nn.Module):
    """conv's output feeds the BatchNorm and a residual sum: folding would change the sum."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _Twice(nn.Module):
    """One conv and one BatchNorm called twice: folding would be right for neither call alone."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(self.bn(self.conv(x))))


class _Untraceable(nn.Module):
    """Data-dependent control flow (fx cannot trace it) around a Sequential and a declared pair."""

    conv_bn_pairs = (("conv", "bn"),)

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.other_conv, self.other_bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # not declared

    def forward(self, x):
        x = self.bn(self.conv(x))
        if x.sum() > 0:
            x = -x
        return self.other_bn(self.other_conv(self.block(x)))


class _ReadsWeight(nn.Module):
    """conv's weight is also read directly in forward (a get_attr node): folding would change that use."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return nn.functional.conv2d(self.bn(self.conv(x)), self.conv.weight)


class _Hooked(nn.Module):
    """A forward hook on conv: after folding it would see the BatchNorm's output."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.seen = []
        self.conv.register_forward_hook(lambda module, args, output: self.seen.append(output.detach().clone()))

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("make, folded, left", [
    (_Residual, [], {"bn": r"the output of 'conv' is also used by add\(\.\.\.\)"}),
    (_Twice, [], {"bn": r"called more than once in forward"}),
    (_Untraceable, ["bn", "block.1"], {"other_bn": r"neither called in a traced forward nor paired"}),
    (_ReadsWeight, [], {"bn": r"'conv\.weight' is also read directly in a forward \(a get_attr\)"}),
    (_Hooked, [], {"bn": r"'conv' has a forward hook, which would see"}),
], ids=["residual", "twice", "untraceable", "reads-weight", "hooked"])
def test_pairs_that_cannot_be_folded_are_left_with_the_reason(make, folded, left):
    model = _random_model(make)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with pytest.warns(UserWarning, match=rf"fuse_bn: folded {len(folded)} of {len(folded) + len(left)} BatchNorm"):
        fused, report = fuse_bn(model, return_report=True)
    assert report.replaced == folded, str(report)
    assert set(report.skipped) == set(left), str(report)
    for path, why in left.items():
        assert __import__("re").search(why, report.skipped[path]), f"{path}: {report.skipped[path]}"
        assert isinstance(fused.get_submodule(path), nn.BatchNorm2d), f"{path} must be left as it is"
    with torch.no_grad():
        assert_close(fused(x), model(x), f"{make.__name__} fused", rtol=1e-9, atol=1e-10)


def test_a_hooked_layer_sees_what_it_saw_before():
    """Before the fix the pair was folded and the hook on conv silently saw post-BatchNorm values."""
    model = _random_model(_Hooked)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        model(x)
        with pytest.warns(UserWarning, match="forward hook"):
            fused = fuse_bn(model)
        fused(x)
    assert_close(fused.seen[-1], model.seen[0], "what the hook on conv sees", rtol=0, atol=0)


def test_a_hook_on_a_container_does_not_fire_while_tracing():
    """Before the fix fx's trace ran the hook with a Proxy (the user's hook saw no tensor)."""
    seen = []
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), nn.ReLU()).eval()
    model[0].register_forward_hook(lambda module, args, output: seen.append(type(output).__name__))
    fused, report = fuse_bn(model, return_report=True)
    assert seen == [], f"the hook fired while fuse_bn traced the model: {seen}"
    assert report.replaced == ["0.1"] and not report.skipped, str(report)
    fused(torch.randn(1, 3, 5, 5))
    assert seen == ["Tensor"], "the hook is kept and still fires on real calls"


def test_inplace_changes_the_model_itself():
    model = nn.Sequential(SparseHetConv2d(8, 8, 2), nn.BatchNorm2d(8)).eval()
    assert fuse_bn(model, inplace=True) is model and isinstance(model[1], nn.Identity)


def test_refuses_training_mode_and_bad_arguments():
    model = nn.Sequential(SparseHetConv2d(8, 8, 2), nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match=r"eval mode.*call model.eval\(\) first"):
        fuse_bn(model)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fuse_bn("model")
    with pytest.raises(TypeError, match=r"inplace must be a bool, got int \(1\)"):
        fuse_bn(model.eval(), inplace=1)
    with pytest.raises(TypeError, match=r"return_report must be a bool, got str \('yes'\)"):
        fuse_bn(model.eval(), return_report="yes")
    assert isinstance(model[1], nn.BatchNorm2d), "a refused call changes nothing"


@pytest.mark.parametrize("model, why", [
    (nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)), r"its input is '1' \(ReLU\), not a convolution"),
    (nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(5)), r"it has 5 features but the Conv2d has 4 outputs"),
    (nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)), r"no running statistics"),
    (nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm1d(4)), r"a BatchNorm1d after a Conv2d \(expected BatchNorm2d\)"),
], ids=["not-adjacent", "channels", "no-stats", "wrong-dims"])
def test_unfoldable_batchnorm_is_left_with_a_warning_that_counts(model, why):
    with pytest.warns(UserWarning, match=r"fuse_bn: folded 0 of 1 BatchNorm layers; left 1 .*" + why):
        out, report = fuse_bn(model.eval(), return_report=True)
    path = next(iter(report.skipped))
    assert type(out.get_submodule(path)) is type(model.get_submodule(path)), "an unfoldable BatchNorm stays"


def test_shared_layer_is_not_folded():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU(), conv).eval()  # the same conv twice
    with pytest.warns(UserWarning, match="called more than once|registered under several names"):
        fused = fuse_bn(model)
    assert isinstance(fused[1], nn.BatchNorm2d), "folding into a shared conv would change its other use"


def test_fused_sparse_layer_still_converts_and_keeps_its_pattern():
    model = nn.Sequential(SparseHetConv2d(8, 8, 4), _random_bn(nn.BatchNorm2d(8), 3)).eval()
    before = copy.deepcopy(model[0].weight_1x1.shape)
    fused = fuse_bn(model)
    assert fused[0].weight_1x1.shape == before and fused[0].bias is not None
