"""MaskedHetConv2d: the published layout, a diagonal that stays zero, checkpoint loading."""

import warnings

import pytest
import torch
from torch import nn

from helpers import assert_agrees, assert_close, masked_reference_weights, one_by_one_channels, oracle
from sparse_hetconv import HetConvPattern, MaskedHetConv2d, MaskedHetConv3d, to_sparse


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


# -- one numerical semantics (docs/design.md §9) -----------------------------------------------------
INF, NAN = float("inf"), float("nan")


def _garbage_on_the_diagonal(layer, values=(NAN, INF, -INF, 1e30)):
    """Write NaN, +-inf and a huge value over pwc's masked-out block diagonal (in place)."""
    with torch.no_grad():
        dense = layer.pwc.weight.view(layer.out_channels, layer.in_channels)
        diagonal = ~layer.pattern.mask_1x1()
        fill = torch.tensor(values, dtype=dense.dtype).repeat(int(diagonal.sum()))[:int(diagonal.sum())]
        dense.masked_scatter_(diagonal, fill)


def _poisoned_input(shape, values, seed=0):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    spots = [(0, 0, 0, 0), (shape[0] - 1, shape[1] - 1, shape[2] // 2, shape[3] - 1), (0, shape[1] // 2, 1, 1)]
    for spot, value in zip(spots, values):
        x[spot] = value
    return x


def _grads(out, inputs, seed=1):
    weight = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_nonfinite_diagonal_never_reaches_the_output_or_the_gradients(channels_last):
    """Before the fix ``pwc.weight * mask`` made NaN of a NaN or inf on the diagonal (``nan * 0``)."""
    torch.manual_seed(0)
    clean = MaskedHetConv2d(8, 12, part=4, stride=2, bias=True, dtype=torch.float64)
    dirty = MaskedHetConv2d(8, 12, part=4, stride=2, bias=True, dtype=torch.float64)
    dirty.load_state_dict(clean.state_dict())
    _garbage_on_the_diagonal(dirty)
    x = torch.randn(2, 8, 7, 6, dtype=torch.float64)
    if channels_last:
        x, clean, dirty = (t.to(memory_format=torch.channels_last) for t in (x, clean, dirty))
    x_clean, x_dirty = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    expected, got = clean(x_clean), dirty(x_dirty)
    assert torch.isfinite(got).all(), "a non-finite value on the masked-out diagonal reached the output"
    assert_close(got, expected, "output with garbage on the diagonal")
    names = ["input"] + [name for name, _ in dirty.named_parameters()]
    want = _grads(expected, [x_clean] + list(clean.parameters()))
    have = _grads(got, [x_dirty] + list(dirty.parameters()))
    for name, g, e in zip(names, have, want):
        assert_close(g, e, f"gradient of {name} with garbage on the diagonal")
    assert torch.count_nonzero(_diagonal_of(dirty, have[names.index("pwc.weight")])) == 0, \
        "the diagonal must get exactly zero gradient"


def _diagonal_of(layer, weight):
    return layer.pattern.block_diagonal(weight.reshape(layer.out_channels, layer.in_channels))


@pytest.mark.parametrize("values", [(INF,), (-INF,), (NAN,), (INF, -INF, NAN)], ids=["inf", "-inf", "nan", "mixed"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_nonfinite_inputs_follow_the_definition(values, grad):
    """An inf on a channel of a filter's own block met a stored zero of pwc (``0 * inf = NaN``) where
    the definition adds nothing; eager CPU calls now compute the 1 x 1 part from the existing kernels."""
    torch.manual_seed(0)
    layer = MaskedHetConv2d(8, 12, part=4, bias=True, dtype=torch.float64)
    _garbage_on_the_diagonal(layer)
    x = _poisoned_input((2, 8, 5, 5), values).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        got = layer(x)
    params = list(layer.parameters())
    expected = oracle(x, *masked_reference_weights(layer), layer.stride, layer.part)
    assert_agrees(got, expected, f"masked {values}: output")
    if grad:
        names = ["input"] + [name for name, _ in layer.named_parameters()]
        have = _grads(got, [x] + params)
        for name, g, e in zip(names, have, _grads(expected, [x] + params)):
            assert_agrees(g, e, f"masked {values}: gradient of {name}")
        assert torch.count_nonzero(_diagonal_of(layer, have[names.index("pwc.weight")])) == 0, \
            "the diagonal must get exactly zero gradient"


@pytest.mark.parametrize("values", [(INF,), (INF, -INF, NAN)], ids=["inf", "mixed"])
def test_to_sparse_gives_the_definitions_answer(values):
    torch.manual_seed(0)
    model = nn.Sequential(MaskedHetConv2d(8, 16, part=4, bias=True), nn.ReLU(), MaskedHetConv2d(16, 8, part=2))
    model = model.double()
    for layer in (model[0], model[2]):
        _garbage_on_the_diagonal(layer)
    sparse = to_sparse(model)
    x = _poisoned_input((2, 8, 6, 6), values)
    hidden = oracle(x, *masked_reference_weights(model[0]), 1, 4).relu()
    expected = oracle(hidden, *masked_reference_weights(model[2]), 1, 2)
    with torch.no_grad():
        assert_agrees(sparse(x), expected, f"to_sparse of the masked model, input with {values}")
        assert_agrees(model(x), expected, f"the masked model, input with {values}")


@pytest.mark.parametrize("dims, shape, stride", [(2, (1, 1), 2), (2, (2, 1), 3), (3, (1, 3, 3), 1), (3, (2, 1, 1), 1)])
def test_bfloat16_gwc_where_onednn_is_wrong(dims, shape, stride):
    """gwc runs in float32 where oneDNN's bfloat16 convolution is wrong (garbage gradients, and in
    3-D outputs); many seeds, since the garbage is whatever memory held."""
    cls = MaskedHetConv2d if dims == 2 else MaskedHetConv3d
    for seed in range(8):
        torch.manual_seed(seed)
        layer = cls(16, 16, part=2, stride=stride, bias=True, dtype=torch.bfloat16)
        x = torch.randn((2, 16) + shape, dtype=torch.bfloat16, requires_grad=True)
        out = layer(x)
        names = ["input", "gwc.weight", "pwc.weight", "gwc.bias"]
        params = [x, layer.gwc.weight, layer.pwc.weight, layer.gwc.bias]
        params64 = [p.detach().double().requires_grad_() for p in params]
        x64, kxk, pwc, bias = params64  # the weights read by definition from float64 copies
        values = torch.stack([pwc.reshape(16, 16)[j, one_by_one_channels(j, 16, 16, 2)] for j in range(16)])
        expected = oracle(x64, kxk, values, bias, layer.stride, 2)
        assert_agrees(out, expected, f"bfloat16 {shape} stride {stride} seed {seed}: output", tol=2e-2)
        for name, g, e in zip(names, _grads(out.double(), params), _grads(expected, params64)):
            assert_agrees(g, e, f"bfloat16 {shape} stride {stride} seed {seed}: gradient of {name}", tol=5e-2)


def test_loading_a_non_finite_diagonal_zeroes_it_instead_of_folding():
    """A NaN on the checkpoint's diagonal is no kernel's weight (docs/design.md §9): loading must not
    fold it into the centre taps (which would make the whole filter NaN)."""
    torch.manual_seed(0)
    source = MaskedHetConv2d(8, 8, part=4, dtype=torch.float64)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["pwc.weight"][0, 0] = float("nan")  # filter 0, channel 0: inside its own block
    layer = MaskedHetConv2d(8, 8, part=4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="inf or NaN on the block diagonal"):
        layer.load_state_dict(state)
    assert torch.equal(layer.gwc.weight, source.gwc.weight), "the centre taps must not change"
    assert torch.isfinite(layer.pwc.weight).all() and layer.pwc.weight[0, 0] == 0
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    assert_close(layer(x), source(x), "the layer computes what the finite checkpoint computes")


def test_a_non_finite_diagonal_entry_drops_only_itself():
    """One NaN on the diagonal must not discard the finite diagonal entries of other filters: those
    are folded into the centre taps as for any checkpoint with a non-zero diagonal."""
    torch.manual_seed(0)
    source = MaskedHetConv2d(8, 8, part=4, dtype=torch.float64)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["pwc.weight"][0, 0] = float("inf")  # filter 0 (group 0), channel 0: its own block
    state["pwc.weight"][3, 3] = 0.5  # filter 3 (group 1), channel 3: its own block, finite
    finite = {k: v.clone() for k, v in state.items()}
    finite["pwc.weight"][0, 0] = 0
    layer = MaskedHetConv2d(8, 8, part=4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="inf or NaN on the block diagonal"):
        layer.load_state_dict(state)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    expected = (nn.functional.conv2d(x, finite["gwc.weight"], None, 1, 1, 1, 4)
                + nn.functional.conv2d(x, finite["pwc.weight"]))
    assert_close(layer(x), expected, "the layer computes the checkpoint's finite gwc(x) + pwc(x)")
    assert torch.isfinite(layer.pwc.weight).all() and not layer.pattern.block_diagonal(
        layer.pwc.weight.view(8, 8)).any(), "the diagonal must be zero after loading"
