"""MaskedHetConv2d: the published layout, a diagonal that stays zero, checkpoint loading."""

import warnings

import pytest
import torch
from torch import nn

from helpers import assert_close, masked_reference_weights, oracle
from sparse_hetconv import HetConvPattern, MaskedHetConv2d


def _diagonal(layer):
    p = layer.pattern
    return p.block_diagonal(layer.pwc.weight.detach().view(layer.out_channels, layer.in_channels))


def test_published_module_layout():
    layer = MaskedHetConv2d(64, 128, part=4)
    assert list(layer.state_dict()) == ["gwc.weight", "pwc.weight"], "keys must match the published script"
    assert layer.gwc.groups == 4 and layer.gwc.kernel_size == (3, 3) and layer.gwc.padding == (1, 1)
    assert layer.pwc.kernel_size == (1, 1) and layer.pwc.groups == 1 and layer.pwc.bias is None
    assert list(layer.buffers()) == [], "no mask buffer: the mask is derived from (M, N, P)"
    assert repr(MaskedHetConv2d(8, 8, part=2, stride=2, bias=True)).startswith(
        "MaskedHetConv2d(\n  8, 8, part=2, stride=2, bias=True")


def test_diagonal_starts_at_zero():
    layer = MaskedHetConv2d(16, 16, part=4)
    assert torch.count_nonzero(_diagonal(layer)) == 0
    assert torch.count_nonzero(layer.pwc.weight) == 16 * 12, "off-diagonal weights must be initialised"


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
], ids=["sgd", "sgd-nesterov", "adam", "adamw"])
def test_diagonal_stays_exactly_zero_with_plain_training_loop(make_optimizer):
    torch.manual_seed(0)
    model = nn.Sequential(MaskedHetConv2d(8, 16, part=4), nn.ReLU(), MaskedHetConv2d(16, 8, part=2, stride=2))
    opt = make_optimizer(model.parameters())
    start = [layer.pwc.weight.detach().clone() for layer in (model[0], model[2])]
    for _ in range(25):
        x = torch.randn(4, 8, 6, 6)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for layer, before in zip((model[0], model[2]), start):
        assert torch.count_nonzero(_diagonal(layer)) == 0, "block diagonal drifted away from zero"
        assert not torch.equal(layer.pwc.weight, before), "the off-diagonal weights should have trained"


def test_diagonal_is_ignored_by_forward():
    torch.manual_seed(0)
    layer = MaskedHetConv2d(8, 8, part=2, dtype=torch.float64)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    before = layer(x)
    with torch.no_grad():
        layer.pwc.weight.view(8, 8)[0, 0] = 100.0  # on filter 0's block: not a HetConv weight
    assert_close(layer(x), before, "a block-diagonal pwc weight must not change the output")


def test_loading_nonzero_diagonal_folds_into_centre_taps():
    torch.manual_seed(0)
    # An "approximate HetConv" checkpoint: gwc(x) + pwc(x) with an unmasked pwc.
    gwc = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4, bias=False).double()
    pwc = nn.Conv2d(8, 12, 1, stride=2, bias=False).double()
    state = {"gwc.weight": gwc.weight.detach().clone(), "pwc.weight": pwc.weight.detach().clone()}
    originals = {k: v.clone() for k, v in state.items()}
    layer = MaskedHetConv2d(8, 12, part=4, stride=2, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"non-zero on the block diagonal; folded it into gwc's centre taps"):
        layer.load_state_dict(state)
    x = torch.randn(3, 8, 9, 9, dtype=torch.float64)
    assert_close(layer(x), gwc(x) + pwc(x), "folded layer vs the checkpoint's gwc(x) + pwc(x)", rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(_diagonal(layer)) == 0, "after folding the diagonal must be zero"
    for key, value in state.items():
        assert torch.equal(value, originals[key]), f"loading modified the caller's tensor {key}"


def test_loading_masked_checkpoint_is_silent_and_exact():
    source = MaskedHetConv2d(8, 8, part=2)
    target = MaskedHetConv2d(8, 8, part=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        target.load_state_dict(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_loading_wrong_shapes_reports_as_usual():
    target = MaskedHetConv2d(8, 8, part=2)
    bad = MaskedHetConv2d(8, 8, part=4).state_dict()
    with pytest.raises(RuntimeError, match=r"size mismatch for gwc.weight"):
        target.load_state_dict(bad)


def test_masked_matches_oracle_with_bias_and_stride():
    torch.manual_seed(0)
    layer = MaskedHetConv2d(6, 9, part=3, kernel_size=5, stride=2, bias=True, dtype=torch.float64)
    x = torch.randn(2, 6, 7, 8, dtype=torch.float64)
    assert_close(layer(x), oracle(x, *masked_reference_weights(layer), layer.stride, 3), "masked vs oracle")


def test_input_errors():
    with pytest.raises(ValueError, match=r"MaskedHetConv2d expects input with 8 channels \(dim 1\), got 4"):
        MaskedHetConv2d(8, 8, part=2)(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match=r"out_channels \(9\) must be divisible by part \(2\)"):
        MaskedHetConv2d(8, 9, part=2)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(bias="no"), TypeError, r"bias must be a bool, got str \('no'\)"),  # used to build a bias in gwc
    (dict(stride=0), ValueError, r"stride \(0\) must be an int >= 1"),
    (dict(kernel_size=4), ValueError, r"kernel_size \(4\) must be odd"),
    (dict(kernel_size=(3, 3, 3)), ValueError, r"kernel_size \(\(3, 3, 3\)\) must be an int or a sequence of 2"),
    (dict(part=2.0), TypeError, r"part must be an int, got float"),
    (dict(dtype=torch.bool), ValueError, r"dtype \(torch.bool\) must be a floating-point or complex"),
])
def test_constructor_errors(kwargs, error, message):
    arguments = dict(in_channels=8, out_channels=8, part=2) | kwargs
    with pytest.raises(error, match=message):
        MaskedHetConv2d(**arguments)


def test_pattern_attribute():
    assert MaskedHetConv2d(8, 4, part=2).pattern == HetConvPattern(8, 4, 2)
