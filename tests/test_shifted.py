"""from_shifted / to_shifted and ChannelPermutation: the paper's shifted pattern, exactly, with no
permutation left at run time in a chain (sparse_hetconv.shifted, sparse_hetconv.permutation)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import assert_close, oracle_of
from published import HetConv2d, HetConv2d_v2, SxproVGG, train_briefly
from sparse_hetconv import (
    ChannelPermutation,
    MaskedHetConv2d,
    SparseHetConv2d,
    from_shifted,
    shifted_mask,
    shifted_to_block_permutation,
    to_shifted,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def randomise_batchnorm(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for t, low, high in ((m.weight, 0.5, 2), (m.bias, -1, 1), (m.running_mean, -1, 1),
                                     (m.running_var, 0.5, 2)):
                    t.copy_(torch.rand(t.shape, generator=generator, dtype=t.dtype) * (high - low) + low)
    return model


def permutations_in(model):
    return [name for name, m in model.named_modules() if isinstance(m, ChannelPermutation)]


def same_function(source, converted, shape, what, train=False):
    """Outputs and input gradients of two float64 models on one random batch agree."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    weights = None
    grads = []
    for model in (source, converted):
        model.train(train)
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        weights = torch.randn(y.shape, generator=generator, dtype=y.dtype) if weights is None else weights
        (y * weights).sum().backward()
        grads.append((y.detach(), xi.grad))
    assert_close(grads[1][0], grads[0][0], f"{what}: outputs", rtol=1e-10, atol=1e-12)
    assert_close(grads[1][1], grads[0][1], f"{what}: input gradients", rtol=1e-10, atol=1e-12)


# -- the mask and the permutation module -----------------------------------------------------------
def test_shifted_mask_is_the_papers_drawing():
    mask = shifted_mask(8, 6, part=2, kernel_size=3)
    assert mask.shape == (6, 8, 3, 3) and mask.dtype == torch.bool
    for j in range(6):
        for c in range(8):
            expected = torch.ones(3, 3, dtype=torch.bool) if (c - j) % 2 == 0 else \
                torch.zeros(3, 3, dtype=torch.bool).index_put_((torch.tensor(1), torch.tensor(1)), torch.tensor(True))
            assert torch.equal(mask[j, c], expected), f"filter {j}, channel {c}: wrong taps"
    with pytest.raises(ValueError, match=r"in_channels \(6\) must be divisible by part \(4\)"):
        shifted_mask(6, 8, part=4)


def test_channel_permutation_applies_and_inverts():
    p = ChannelPermutation([2, 0, 3, 1])
    x = torch.arange(2 * 4 * 3.).reshape(2, 4, 3)
    assert torch.equal(p(x), x[:, [2, 0, 3, 1]]), "output channel i must be input channel perm[i]"
    assert torch.equal(p.inverse()(p(x)), x), "inverse() must undo the permutation"
    assert not p.is_identity() and ChannelPermutation(range(3)).is_identity()
    assert p.state_dict()["perm"].tolist() == [2, 0, 3, 1], "the permutation belongs to the state_dict"
    assert "4, perm=[2, 0, 3, 1]" in repr(p)
    with pytest.raises(ValueError, match=r"perm \(\[0, 0, 1\]\) must be a permutation of range\(C\)"):
        ChannelPermutation([0, 0, 1])
    with pytest.raises(ValueError, match=r"expects an input with 4 channels \(dim 1\), got shape \(2, 3\)"):
        p(torch.zeros(2, 3))


# -- sxpro's per-filter layers ------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [HetConv2d, HetConv2d_v2])
def test_sxpro_layers_in_a_vgg_chain_convert_exactly_with_no_permutation(layer):
    torch.manual_seed(0)
    source = randomise_batchnorm(SxproVGG(layer, [8, "M", 8, "M", 16, 16, "M"], p=4).double())
    train_briefly(source, (4, 3, 8, 8))
    before = copy.deepcopy(source.state_dict())
    converted, report = from_shifted(source, return_report=True)
    assert report.replaced == ["features.4", "features.8", "features.11"], report
    assert report.exact and report.permutations == [] and permutations_in(converted) == [], \
        f"a VGG chain must need no permutation at run time: {report.permutations}"
    for path in report.replaced:
        new = converted.get_submodule(path)
        assert isinstance(new, SparseHetConv2d) and new.part == 4 and new.bias is not None, f"{path}: {new!r}"
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in before.items()), "the source must not change"
    same_function(source, converted, (2, 3, 8, 8), f"{layer.__name__} VGG")
    same_function(source, converted, (3, 3, 8, 8), f"{layer.__name__} VGG in training mode", train=True)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    layer_ = converted.features[4]
    assert_close(layer_(x), oracle_of(layer_, x), "converted layer vs the definition oracle")


def test_flatten_into_a_linear_over_several_pixels_absorbs_the_permutation():
    """``x.view(x.size(0), -1)`` over 2 x 2 pixels: the Linear's columns move per channel block."""
    torch.manual_seed(0)
    source = randomise_batchnorm(SxproVGG(HetConv2d_v2, [8, 8, "M", 16, 16, "M"], p=4, spatial=4).double().eval())
    converted, report = from_shifted(source, memory_format=None, return_report=True)
    assert report.permutations == [] and len(report.replaced) == 3, report
    same_function(source, converted, (2, 3, 8, 8), "flatten over 2 x 2 pixels")


def test_a_shifted_layer_at_the_models_input_keeps_an_explicit_permutation():
    torch.manual_seed(0)
    source = nn.Sequential(HetConv2d_v2(8, 8, p=2), nn.ReLU(), nn.Conv2d(8, 3, 1)).double()
    converted, report = from_shifted(source, return_report=True)
    assert report.permutations == ["0.permute_in"], "nothing before the input can absorb its permutation"
    assert isinstance(converted[0].layer, SparseHetConv2d) and "permute_out" not in dict(converted[0].named_children())
    assert torch.equal(converted[0].permute_in.perm, shifted_to_block_permutation(8, 2))
    same_function(source, converted, (2, 8, 5, 5), "shifted layer at the input")


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1, self.bn1 = HetConv2d_v2(8, 8, p=2), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = HetConv2d_v2(8, 8, p=2), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(x + y), 1), 1))


def test_a_residual_branch_keeps_its_permutations_and_the_report_says_where():
    torch.manual_seed(0)
    source = randomise_batchnorm(Residual().double())
    converted, report = from_shifted(source, return_report=True)
    # Inside the branch the two layers' permutations cancel; at the branch's ends x is read twice.
    assert report.permutations == ["conv1.permute_in", "conv2.permute_out"], report.permutations
    assert permutations_in(converted) == report.permutations
    same_function(source, converted, (2, 3, 6, 6), "residual block")


class Untraceable(nn.Module):
    """torch.fx cannot trace this forward (control flow on a tensor): nn.Sequential order is used."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  HetConv2d(8, 8, p=4), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))

    def forward(self, x):
        return self.body(x) if x.sum() > -1e9 else -self.body(x)


def test_without_torch_fx_permutations_are_absorbed_along_an_nn_sequential():
    torch.manual_seed(0)
    source = randomise_batchnorm(Untraceable().double())
    converted, report = from_shifted(source, return_report=True)
    assert report.permutations == [] and isinstance(converted.body[3], SparseHetConv2d), report
    same_function(source, converted, (2, 3, 6, 6), "untraceable model")


def test_different_parts_next_to_each_other_keep_one_permutation():
    torch.manual_seed(0)
    source = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), HetConv2d_v2(8, 8, p=2), nn.ReLU(),
                           HetConv2d_v2(8, 8, p=4), nn.Conv2d(8, 2, 1)).double()
    converted, report = from_shifted(source, return_report=True)
    assert len(report.permutations) == 1, f"P=2 next to P=4 cannot cancel: {report.permutations}"
    same_function(source, converted, (2, 3, 5, 5), "parts 2 and 4")


def test_a_shared_layer_stays_shared_and_keeps_its_permutations():
    torch.manual_seed(0)
    shared = HetConv2d_v2(8, 8, p=2)
    source = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), shared, nn.ReLU(), shared, nn.Conv2d(8, 2, 1)).double()
    converted, report = from_shifted(source, return_report=True)
    assert converted[1] is converted[3], "a layer used twice must stay one module"
    assert report.replaced == ["1"] and report.shared == {"1": ["3"]}, report
    assert sum(p.numel() for p in converted.parameters()) == report.params_after
    same_function(source, converted, (2, 3, 5, 5), "shared shifted layer")


class ReadsWeightDirectly(nn.Module):
    """``self.post.weight`` is read in forward (a get_attr node) besides ``self.post`` being called."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.het = HetConv2d_v2(8, 8, p=2)
        self.post = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return nn.functional.conv2d(self.post(self.het(self.stem(x))), self.post.weight)


class TiedWeight(nn.Module):
    """``post`` and ``other`` share one weight tensor."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.het = HetConv2d_v2(8, 8, p=2)
        self.post = nn.Conv2d(8, 8, 1)
        self.other = nn.Conv2d(8, 8, 1)
        self.other.weight = self.post.weight

    def forward(self, x):
        return self.other(self.post(self.het(self.stem(x))))


@pytest.mark.parametrize("model", [ReadsWeightDirectly, TiedWeight])
def test_a_convolution_whose_weight_is_used_elsewhere_does_not_absorb_a_permutation(model):
    """Before the fix the permutation was copied into ``post.weight`` in place: the other use of
    that tensor saw it permuted (output change ~1), and the report said no permutation was left."""
    torch.manual_seed(0)
    source = model().double()
    converted, report = from_shifted(source, return_report=True)
    assert report.permutations == ["het.permute_out"], report.permutations
    assert permutations_in(converted) == report.permutations
    if model is TiedWeight:
        assert converted.other.weight is converted.post.weight, "the tie must survive the conversion"
    same_function(source, converted, (2, 3, 5, 5), model.__name__)


def test_a_pool_after_a_flatten_stops_the_permutation():
    """After a Flatten, AvgPool1d pools across features (it mixes channels): before the fix the
    permutation was carried through it as per-channel (output change 9e-3, reported exact)."""
    torch.manual_seed(0)
    source = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), HetConv2d_v2(8, 8, p=2), nn.Flatten(),
                           nn.AvgPool1d(3, 2, 1), nn.Linear(64, 4)).double()
    converted, report = from_shifted(source, return_report=True)
    assert report.permutations == ["1.permute_out"], report.permutations
    same_function(source, converted, (2, 3, 4, 4), "pool after a flatten")


@pytest.mark.parametrize("traceable", [True, False], ids=["fx", "sequential"])
def test_a_hooked_container_stops_the_permutation(traceable, monkeypatch):
    """A forward hook on a container the permutation would pass through must see what it saw
    before the conversion (the model's output alone was the same)."""
    torch.manual_seed(0)
    source = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                           nn.Sequential(HetConv2d_v2(8, 8, p=2), nn.BatchNorm2d(8), nn.ReLU()),
                           nn.Conv2d(8, 4, 1)).double()
    randomise_batchnorm(source).eval()
    seen = []
    source[1].register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    if not traceable:  # the nn.Sequential route
        monkeypatch.setattr("torch.fx.Tracer.trace", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no fx")))
    converted = from_shifted(source)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        source(x), converted(x)
    assert len(seen) == 2, f"the hook ran {len(seen)} times"
    assert_close(seen[1], seen[0], "what the container's hook sees")


# -- dense convolutions under a shifted mask (the naive implementation) ------------------------------
def masked_dense_net(P=4, exact=True):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 9, 5)).double()
    masks = {3: shifted_mask(8, 16, P), 6: shifted_mask(16, 16, P)}
    with torch.no_grad():
        for i, mask in masks.items():
            net[i].weight.mul_(mask)

    def mask_grads(model):
        for i, mask in masks.items():
            model[i].weight.grad.mul_(mask)

    train_briefly(net, (4, 3, 6, 6), mask_grads=mask_grads if exact else None)
    return randomise_batchnorm(net)


def test_dense_convolutions_trained_under_a_shifted_mask_convert_exactly():
    source = masked_dense_net()
    converted, report = from_shifted(source, part=4, return_report=True)
    assert report.replaced == ["3", "6"] and report.skipped == {"0": "first convolution (skip_first=True)"}, report
    assert report.exact and report.permutations == [], report
    assert isinstance(converted[3], SparseHetConv2d) and converted[3].stride == (2, 2)
    same_function(source, converted, (2, 3, 6, 6), "masked dense convolutions")
    masked = from_shifted(source, part=4, form="masked", memory_format=None)
    assert isinstance(masked[6], MaskedHetConv2d) and masked[6].gwc.bias is None
    same_function(source, masked, (2, 3, 6, 6), "masked dense convolutions, masked form")


def test_weights_outside_the_pattern_are_skipped_unless_approximate_and_then_reported():
    source = masked_dense_net(exact=False)  # trained without masking the gradients
    with pytest.warns(UserWarning, match="no layer to convert"):
        _, report = from_shifted(source, part=4, return_report=True)
    assert set(report.skipped) == {"0", "3", "6"} and "weights outside the shifted pattern" in report.skipped["3"]
    converted, report = from_shifted(source, part=4, approximate=True, return_report=True)
    assert not report.exact and set(report.dropped) == {"3", "6"}, report
    for path in ("3", "6"):
        weight = source.get_submodule(path).weight.detach()
        outside = weight.abs() * ~shifted_mask(weight.shape[1], weight.shape[0], 4)
        dropped, change = report.dropped[path]
        assert dropped == pytest.approx(float(outside.max()), rel=1e-12), f"{path}: largest dropped weight"
        conv = source.get_submodule(path)
        x = torch.randn(1, conv.in_channels, 7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        with torch.no_grad():
            kept = nn.functional.conv2d(x, weight * shifted_mask(weight.shape[1], weight.shape[0], 4), conv.bias,
                                        conv.stride, 1)
            full = conv(x)
        assert 0 < change == pytest.approx(float((kept - full).norm() / full.norm()), rel=1e-6), \
            f"{path}: relative change on the probe"
    assert report.max_dropped_weight == max(d for d, _ in report.dropped.values()) and "NOT exact" in str(report)


# -- the reverse ----------------------------------------------------------------------------------------
def block_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        SparseHetConv2d(8, 16, part=4, bias=True), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                        MaskedHetConv2d(16, 16, part=4, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)).double()
    return randomise_batchnorm(train_briefly(net, (4, 3, 8, 8)))


def test_to_shifted_gives_dense_convolutions_in_the_papers_pattern_and_back():
    source = block_net()
    shifted, report = to_shifted(source, return_report=True)
    assert report.replaced == ["3", "7"] and report.permutations == [], report
    for i, (n_out, n_in) in ((3, (16, 8)), (7, (16, 16))):
        conv = shifted[i]
        assert type(conv) is nn.Conv2d and conv.weight.shape[:2] == (n_out, n_in), f"{i}: {conv!r}"
        assert not (conv.weight * ~shifted_mask(n_in, n_out, 4)).any(), f"{i}: a weight outside the shifted pattern"
    same_function(source, shifted, (2, 3, 8, 8), "to_shifted")
    back = from_shifted(shifted, part=4)
    assert isinstance(back[3], SparseHetConv2d) and isinstance(back[7], SparseHetConv2d)
    expected = to_masked_state(source)
    for key, value in to_masked_state(back).items():
        assert torch.equal(value, expected[key]), f"round trip changed {key}"


def to_masked_state(model):
    from sparse_hetconv import to_masked

    return to_masked(model, memory_format=None).state_dict()


# -- what is refused -----------------------------------------------------------------------------------
class NotAConvolution(HetConv2d_v2):
    def forward(self, x):
        return torch.relu(super().forward(x))


def test_refusals_name_the_module_and_leave_the_model_untouched():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), HetConv2d_v2(8, 8, p=4), NotAConvolution(8, 8, p=4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"module '2' \(NotAConvolution\) cannot be read as a convolution: it is "
                                         r"not linear"):
        from_shifted(model, inplace=True)
    assert isinstance(model[1], HetConv2d_v2) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match=r"module '0' \(HetConv2d_v2\): out_channels \(6\) must be divisible by "
                                         r"part \(4\)"):
        from_shifted(nn.Sequential(HetConv2d_v2(8, 6, p=4)))
    layer = HetConv2d_v2(8, 8, p=4)
    calls = []
    layer.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"module '0' \(HetConv2d_v2\) has a forward hook, but this converter "
                                         r"changes the order of the layer's channels"):
        from_shifted(nn.Sequential(layer))
    assert calls == [], "converting must not run the user's hooks"
    with pytest.raises(TypeError, match=r"approximate must be a bool, got str"):
        from_shifted(model, approximate="yes")
    with pytest.raises(ValueError, match=r"part \(0\) must be an int >= 1"):
        from_shifted(model, part=0)


# -- properties ----------------------------------------------------------------------------------------
from hypothesis import given, strategies as st  # noqa: E402


@given(part=st.sampled_from([2, 4]), blocks_in=st.integers(1, 3), blocks_out=st.integers(1, 3),
       kernel=st.sampled_from([3, 5]), stride=st.sampled_from([1, 2]), bias=st.booleans(), seed=st.integers(0, 99))
def test_any_masked_dense_convolution_round_trips_exactly(part, blocks_in, blocks_out, kernel, stride, bias, seed):
    """A dense convolution under the shifted mask, between a stem and a head that absorb the
    permutations: from_shifted is exact with none left, and to_shifted gives the weights back."""
    torch.manual_seed(seed)
    m, n = part * blocks_in, part * blocks_out
    conv = nn.Conv2d(m, n, kernel, stride, kernel // 2, bias=bias).double()
    with torch.no_grad():
        conv.weight.mul_(shifted_mask(m, n, part, kernel))
    source = nn.Sequential(nn.Conv2d(2, m, 1), nn.BatchNorm2d(m), conv, nn.ReLU(), nn.Conv2d(n, 3, 1)).double()
    randomise_batchnorm(source, seed)
    converted, report = from_shifted(source, part=part, skip_first=False, include=lambda path, c: path == "2",
                                     return_report=True)
    assert report.replaced == ["2"] and report.exact and report.permutations == [], report
    same_function(source, converted, (1, 2, 7, 6), f"P={part} M={m} N={n} k={kernel} s={stride}")
    back = to_shifted(converted)
    for key, value in source.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), f"to_shifted(from_shifted(.)) changed {key}"


class Head(nn.Module):
    """Two 1-channel convolutions side by side (a detection head): not a layer of filters."""

    def __init__(self):
        super().__init__()
        self.score = nn.Conv2d(8, 1, 3, padding=1)
        self.box = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        return self.score(x), self.box(x)


def test_other_modules_of_one_channel_convolutions_are_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Head())
    with pytest.warns(UserWarning, match="from_shifted: the model has no layer to convert"):
        new = from_shifted(model)
    assert isinstance(new[1], Head) and isinstance(new[1].score, nn.Conv2d)
