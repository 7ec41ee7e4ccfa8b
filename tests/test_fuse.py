"""fuse_bn: BatchNorm folded into the layer before it, exactly, for every supported layer type."""

import copy

import pytest
import torch
from torch import nn

from helpers import assert_close
from sparse_hetconv import MaskedHetConv2d, MaskedHetConv3d, SparseHetConv2d, SparseHetConv3d, fuse_bn
from sparse_hetconv.models import vgg16_cifar


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
}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_fused_layer_computes_what_layer_and_batchnorm_computed(kind, bias, affine):
    torch.manual_seed(0)
    layer = LAYERS[kind](bias)
    dims = 0 if kind == "linear" else int(kind[-2])
    bn_type = {0: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    model = nn.Sequential(layer, _random_bn(bn_type(12 if dims != 3 else 6, affine=affine, dtype=torch.float64), 1),
                          nn.ReLU()).eval()
    shape = {0: (5, 8), 2: (2, 8, 9, 7), 3: (2, 4, 5, 4, 6)}[dims]
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


def test_whole_vgg_in_both_forms_folds_every_batchnorm():
    for form in ("sparse", "masked"):
        torch.manual_seed(0)
        model = vgg16_cifar(part=4, form=form).double()
        for i, m in enumerate(model.modules()):
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                _random_bn(m, i)
        model.eval()
        x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
        fused = fuse_bn(model)
        left = [m for m in fused.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert not left, f"{form}: {len(left)} BatchNorm modules were not folded"
        assert_close(fused(x), model(x), f"vgg16_cifar {form} fused", rtol=1e-9, atol=1e-10)


def test_inplace_changes_the_model_itself():
    model = nn.Sequential(SparseHetConv2d(8, 8, 2), nn.BatchNorm2d(8)).eval()
    assert fuse_bn(model, inplace=True) is model and isinstance(model[1], nn.Identity)


def test_refuses_training_mode_and_bad_arguments():
    model = nn.Sequential(SparseHetConv2d(8, 8, 2), nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match=r"eval mode.*call model.eval\(\) first"):
        fuse_bn(model)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fuse_bn("model")
    with pytest.raises(TypeError, match="inplace must be a bool"):
        fuse_bn(model.eval(), inplace=1)


def test_nothing_to_fold_warns_and_leaves_unmatched_pairs():
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()  # not adjacent
    with pytest.warns(UserWarning, match="no BatchNorm directly follows"):
        out = fuse_bn(model)
    assert isinstance(out[2], nn.BatchNorm2d)
    mismatched = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(5)).eval()  # wrong channel count
    with pytest.warns(UserWarning):
        assert isinstance(fuse_bn(mismatched)[1], nn.BatchNorm2d)
    no_stats = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.warns(UserWarning):
        assert isinstance(fuse_bn(no_stats)[1], nn.BatchNorm2d)


def test_fused_sparse_layer_still_converts_and_keeps_its_pattern():
    model = nn.Sequential(SparseHetConv2d(8, 8, 4), _random_bn(nn.BatchNorm2d(8), 3)).eval()
    before = copy.deepcopy(model[0].weight_1x1.shape)
    fused = fuse_bn(model)
    assert fused[0].weight_1x1.shape == before and fused[0].bias is not None
