"""to_sparse / to_masked / hetconvify on whole models: exactness, copies, names, errors."""

import copy

import pytest
import torch
from torch import nn

from helpers import assert_close, oracle_of
from published import Efficient_HetConv2d, PublishedHetConv, train_briefly
from sparse_hetconv import (
    ConversionReport,
    MaskedHetConv2d,
    MaskedHetConv3d,
    SparseHetConv2d,
    SparseHetConv3d,
    hetconvify,
    to_masked,
    to_sparse,
)


pytestmark = pytest.mark.usefixtures("one_thread")


class ProductNotSum(PublishedHetConv):
    def forward(self, x):
        return self.gwc(x) * self.pwc(x)


class WithExtra(PublishedHetConv):
    def __init__(self, *args):
        super().__init__(*args)
        self.bn = nn.BatchNorm2d(args[1])


def _net(dtype=torch.float32):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(MaskedHetConv2d(8, 16, part=4, stride=2), nn.ReLU()),
        MaskedHetConv2d(16, 16, part=2, bias=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).to(dtype)


def _state_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_to_sparse_converts_whole_tree_exactly_and_keeps_the_rest():
    torch.manual_seed(0)
    model = _net(torch.float64).eval()
    before = copy.deepcopy(model.state_dict())
    sparse = to_sparse(model)
    assert isinstance(sparse[3][0], SparseHetConv2d) and isinstance(sparse[4], SparseHetConv2d)
    assert isinstance(sparse[0], nn.Conv2d) and isinstance(sparse[1], nn.BatchNorm2d), "other modules kept"
    assert sparse[3][0].stride == (2, 2) and sparse[4].bias is not None
    assert not sparse.training and not sparse[4].training, "eval state kept"
    assert {p.dtype for p in sparse.parameters()} == {torch.float64}, "dtype kept"
    assert _state_equal(model.state_dict(), before), "to_sparse must not touch its input"
    assert isinstance(model[4], MaskedHetConv2d), "input model must keep its layers"
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    assert_close(sparse(x), model(x), "sparse vs masked model", rtol=1e-12, atol=1e-12)


def test_train_state_kept_per_module():
    model = _net().train()
    model[4].eval()
    sparse = to_sparse(model)
    assert sparse.training and sparse[3][0].training and not sparse[4].training


def test_round_trip_masked_sparse_masked_is_exact():
    torch.manual_seed(0)
    model = _net()
    back = to_masked(to_sparse(model))
    assert isinstance(back[4], MaskedHetConv2d)
    assert _state_equal(back.state_dict(), model.state_dict()), "masked -> sparse -> masked changed weights"


def test_round_trip_sparse_masked_sparse_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(SparseHetConv2d(8, 8, part=4, bias=True), nn.ReLU(), SparseHetConv3d(8, 4, part=2))
    back = to_sparse(to_masked(model))
    assert isinstance(back[2], SparseHetConv3d)
    assert _state_equal(back.state_dict(), model.state_dict())


def test_inplace_returns_the_same_model():
    model = _net()
    out = to_sparse(model, inplace=True)
    assert out is model and isinstance(model[4], SparseHetConv2d)


def test_a_single_layer_converts_too():
    layer = MaskedHetConv2d(8, 8, part=2)
    assert isinstance(to_sparse(layer), SparseHetConv2d)
    assert isinstance(to_masked(SparseHetConv2d(8, 8, part=2)), MaskedHetConv2d)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("pwc_groups", [1, 2])
def test_published_layout_with_unmasked_diagonal_converts_exactly(stride, kernel_size, pwc_groups):
    """An "approximate HetConv": gwc + unmasked pwc. Folding makes the conversion exact."""
    torch.manual_seed(0)
    layer = PublishedHetConv(8, 12, p=4, stride=stride, kernel_size=kernel_size, bias=True,
                             pwc_groups=pwc_groups).double()
    model = nn.Sequential(layer, nn.ReLU())
    sparse = to_sparse(model)
    assert isinstance(sparse[0], SparseHetConv2d) and sparse[0].part == 4
    x = torch.randn(2, 8, 11, 10, dtype=torch.float64)
    assert_close(sparse(x), model(x), f"published layout stride={stride} k={kernel_size}", rtol=1e-10, atol=1e-12)


def test_published_checkpoint_loads_into_masked_form_by_key():
    torch.manual_seed(0)
    published = nn.Sequential(PublishedHetConv(8, 8, p=2), nn.ReLU())
    with torch.no_grad():  # what the published training loop leaves: a zero block diagonal
        published[0].pwc.weight.view(8, 8).masked_fill_(~MaskedHetConv2d(8, 8, 2).pattern.mask_1x1(), 0)
    ours = nn.Sequential(MaskedHetConv2d(8, 8, part=2), nn.ReLU())
    ours.load_state_dict(published.state_dict())
    x = torch.randn(1, 8, 5, 5)
    assert_close(ours(x), published(x), "published checkpoint in MaskedHetConv2d", rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (lambda: ProductNotSum(8, 8, 2),
     r"module '0' \(ProductNotSum\): its forward is not a signed sum of its convolutions \(gwc, pwc\)"),
    (lambda: WithExtra(8, 8, 2), r"module '0' \(WithExtra\) holds more than gwc and pwc"),
])
def test_modules_that_are_not_hetconv_are_refused(bad, message):
    model = nn.Sequential(bad(), MaskedHetConv2d(8, 8, part=2))
    before = copy.deepcopy(model.state_dict())
    for inplace in (False, True):
        with pytest.raises(ValueError, match=message):
            to_sparse(model, inplace=inplace)
        assert isinstance(model[1], MaskedHetConv2d), "a failed conversion must leave the model untouched"
        assert _state_equal(model.state_dict(), before)


def test_mismatched_gwc_pwc_names_the_path_and_problem():
    odd = PublishedHetConv(8, 8, p=2)
    odd.pwc = nn.Conv2d(8, 8, 1, stride=2, bias=False)
    model = nn.Sequential(nn.Sequential(nn.ReLU(), odd))
    with pytest.raises(ValueError, match=r"module '0.1' \(PublishedHetConv\) cannot be read as a HetConv: "
                                         r"pwc.stride \(2, 2\) differs from gwc.stride \(1, 1\)"):
        to_sparse(model)
    odd.pwc = nn.Linear(8, 8)
    with pytest.raises(ValueError, match=r"module '0.1' .* expected children 'gwc' and 'pwc' that are both"):
        to_sparse(model)


def test_gwc_with_wrong_padding_is_refused():
    odd = PublishedHetConv(8, 8, p=2)
    odd.gwc = nn.Conv2d(8, 8, 3, padding=0, groups=2, bias=False)
    with pytest.raises(ValueError, match=r"gwc.padding \(0, 0\) must be kernel_size // 2 = \(1, 1\)"):
        to_sparse(nn.Sequential(odd))


def test_conversion_errors_for_non_modules_and_warning_when_nothing_to_do():
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got dict"):
        to_sparse({})
    with pytest.raises(TypeError, match=r"inplace must be a bool, got str"):
        to_masked(nn.ReLU(), inplace="yes")
    with pytest.warns(UserWarning, match=r"to_sparse: the model has no layer to convert"):
        to_sparse(nn.Sequential(nn.Linear(2, 2)))


def test_3d_layers_convert():
    torch.manual_seed(0)
    model = nn.Sequential(MaskedHetConv3d(4, 8, part=2, stride=2, bias=True)).double()
    sparse = to_sparse(model)
    assert isinstance(sparse[0], SparseHetConv3d)
    x = torch.randn(1, 4, 5, 6, 5, dtype=torch.float64)
    assert_close(sparse(x), model(x), "3-D to_sparse", rtol=1e-12, atol=1e-12)


# -- hetconvify --------------------------------------------------------------------------------
def _cnn():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(32, 30, 3, padding=1), nn.ReLU(),  # 30 not divisible by 4
        nn.Conv2d(30, 32, 1), nn.ReLU(),  # 1x1: nothing to make heterogeneous
        nn.Conv2d(32, 32, 3, padding=1, groups=2),
    )


def test_hetconvify_replaces_what_fits_and_reports_why_not():
    torch.manual_seed(0)
    model = _cnn()
    new, report = hetconvify(model, part=4, return_report=True)
    assert report.replaced == ["2"], report
    assert set(report.skipped) == {"0", "4", "6", "8"}
    assert "first convolution" in report.skipped["0"]
    assert "out_channels (30) is not divisible by part (4)" in report.skipped["4"]
    assert "1x1 convolution" in report.skipped["6"] and "groups is 2" in report.skipped["8"]
    assert isinstance(new[2], SparseHetConv2d) and new[2].stride == (2, 2) and new[2].bias is None
    assert isinstance(model[2], nn.Conv2d), "input model untouched"
    dense_params = 32 * 16 * 9
    het_params = new[2].pattern.num_params()
    assert report.params_before - report.params_after == dense_params - het_params
    assert "replaced 1 layers, skipped 4" in str(report)


def test_hetconvify_keeps_block_kernels_and_masked_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=True))
    new, report = hetconvify(model, part=2, form="masked", skip_first=False, return_report=True)
    layer = new[0]
    assert isinstance(layer, MaskedHetConv2d) and report.replaced == ["0"]
    w = model[0].weight
    assert torch.equal(layer.gwc.weight[:4], w[:4, :4]) and torch.equal(layer.gwc.weight[4:], w[4:, 4:])
    assert torch.equal(layer.pwc.weight[0, 4:, 0, 0], w[0, 4:, 1, 1]), "centre tap for 1x1 kernels"
    assert torch.equal(layer.gwc.bias, model[0].bias)


def test_hetconvify_include_filter_and_warning():
    model = _cnn()
    _, report = hetconvify(model, part=2, include=lambda path, conv: path != "2", return_report=True)
    assert report.skipped["2"] == "excluded by include()" and "4" in report.replaced
    with pytest.warns(UserWarning, match=r"hetconvify: no convolution could be replaced with part=3"):
        hetconvify(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)), part=3, return_report=False)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(part=0), ValueError, r"part \(0\) must be an int >= 1"),
    (dict(part=2, form="dense"), ValueError, r"form \('dense'\) must be one of"),
    (dict(part=2, reduce="max"), ValueError, r"reduce \('max'\) must be one of \('center', 'sum'\)"),
    (dict(part=2, include="all"), TypeError, r"include must be callable or None, got str"),
])
def test_hetconvify_argument_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        hetconvify(_cnn(), return_report=False, **kwargs)


def test_hetconvify_then_fine_tune_works_with_plain_sgd():
    torch.manual_seed(0)
    model = hetconvify(_cnn(), part=2, return_report=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(2, 3, 8, 8)
    opt.zero_grad()
    model(x).mean().backward()
    opt.step()
    assert all(p.grad is not None for p in model.parameters()), "every parameter should get a gradient"


# -- every exact HetConv shape: signed sums of convolution children ----------------------------------
def same_function(source, converted, shape, what):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    results = []
    for model in (source, converted):
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        y.square().sum().backward()
        results.append((y.detach(), xi.grad))
    assert_close(results[1][0], results[0][0], f"{what}: outputs", rtol=1e-10, atol=1e-12)
    assert_close(results[1][1], results[0][1], f"{what}: input gradients", rtol=1e-10, atol=1e-12)


def test_sxpros_efficient_hetconv_converts_exactly_and_back():
    """conv3x3 (grouped) + conv1x1 - conv1x1_ (grouped), all with bias, trained a few steps."""
    torch.manual_seed(0)
    source = nn.Sequential(Efficient_HetConv2d(8, 16, p=4), nn.ReLU(), Efficient_HetConv2d(16, 16, p=4)).double()
    train_briefly(source, (4, 8, 6, 6))
    sparse, report = to_sparse(source, return_report=True)
    assert report.replaced == ["0", "2"] and report.exact, report
    assert all(isinstance(sparse[i], SparseHetConv2d) and sparse[i].part == 4 and sparse[i].bias is not None
               for i in (0, 2))
    same_function(source, sparse, (2, 8, 7, 6), "Efficient_HetConv2d")
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    assert_close(sparse[0](x), oracle_of(sparse[0], x), "converted layer vs the definition oracle")
    same_function(source, to_masked(sparse), (2, 8, 7, 6), "Efficient_HetConv2d -> sparse -> masked")


class Scaled(nn.Module):
    """Any linear combination of grouped k x k and pointwise children, with different kernels and groups."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4)
        self.b = nn.Conv2d(8, 12, 5, stride=2, padding=2, groups=2, bias=False)
        self.c = nn.Conv2d(8, 12, 1, stride=2, groups=2)

    def forward(self, x):
        return 2 * self.a(x) - 0.5 * self.b(x) + self.c(x)


def test_any_signed_sum_of_grouped_and_pointwise_children_is_read_exactly():
    torch.manual_seed(0)
    source = Scaled().double()
    sparse = to_sparse(source)
    assert isinstance(sparse, SparseHetConv2d) and sparse.part == 2 and sparse.kernel_size == (5, 5)
    assert sparse.stride == (2, 2)
    same_function(source, sparse, (1, 8, 9, 11), "2 a - 0.5 b + c")


class Separable(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.pw(self.dw(x))


def test_other_modules_of_convolutions_are_left_alone_and_reported():
    model = nn.Sequential(Separable(), MaskedHetConv2d(8, 8, part=2))
    new, report = to_sparse(model, return_report=True)
    assert isinstance(new[0], Separable) and isinstance(new[1], SparseHetConv2d)
    assert "its forward is not a signed sum of its convolutions (dw, pw)" in report.skipped["0"], report
    with pytest.warns(UserWarning, match=r"no layer to convert; returned it unchanged; skipped <root>: .* not a signed"):
        to_sparse(Separable())


def test_a_masked_layer_whose_children_were_swapped_is_refused():
    layer = MaskedHetConv2d(8, 8, part=4)
    layer.gwc = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
    with pytest.raises(ValueError, match=r"module '1' \(MaskedHetConv2d\) does not compute the HetConv it declares "
                                         r"\(part=4, .*\): gwc.groups is 2, expected 4"):
        to_sparse(nn.Sequential(nn.ReLU(), layer))


def test_a_module_that_computes_something_else_than_its_pattern_is_refused():
    class Tampered(MaskedHetConv2d):
        def forward(self, input):
            return super().forward(input) * 1.5

    with pytest.raises(ValueError, match=r"module '<root>' \(Tampered\) does not compute the HetConv it was read as"):
        to_sparse(Tampered(8, 8, part=2))


# -- shared modules, tied tensors, hooks --------------------------------------------------------------
@pytest.mark.parametrize("converter, layer", [
    (to_sparse, lambda: MaskedHetConv2d(8, 8, part=2)),
    (to_sparse, lambda: PublishedHetConv(8, 8, 2)),
    (to_masked, lambda: SparseHetConv2d(8, 8, part=2)),
    (lambda m, **k: hetconvify(m, part=2, skip_first=False, **k), lambda: nn.Conv2d(8, 8, 3, padding=1)),
])
def test_a_module_shared_at_two_paths_is_converted_once_and_stays_shared(converter, layer):
    torch.manual_seed(0)
    shared = layer().double()
    model = nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared))
    new, report = converter(model, return_report=True)
    assert new[0] is new[2][0], "the two paths must hold one converted module"
    assert report.replaced == ["0"] and report.shared == {"0": ["2.0"]}, report
    assert report.params_after == sum(p.numel() for p in new[0].parameters()), "shared parameters count once"
    if report.exact:
        same_function(model, new, (1, 8, 5, 5), "shared module")


def test_modules_that_share_a_tensor_with_another_are_refused():
    a, b = MaskedHetConv2d(8, 8, part=2), MaskedHetConv2d(8, 8, part=2)
    b.gwc = a.gwc
    with pytest.raises(ValueError, match=r"modules '0' and '1' share the tensor 'gwc.weight' / 'gwc.weight'"):
        to_sparse(nn.Sequential(a, b))
    tied = nn.Sequential(MaskedHetConv2d(8, 8, part=2), nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False))
    tied[1].weight = tied[0].gwc.weight
    with pytest.raises(ValueError, match=r"module '0' \(MaskedHetConv2d\) shares its tensor 'gwc.weight' with "
                                         r"'1.weight', which is not converted with it"):
        to_sparse(tied)


def test_hooks_never_fire_during_conversion_and_follow_the_replaced_module():
    torch.manual_seed(0)
    calls = []
    layer = PublishedHetConv(8, 8, 2).double()
    handle = layer.register_forward_hook(lambda module, args, out: calls.append(type(module).__name__))
    layer.register_forward_pre_hook(lambda module, args: calls.append("pre"))
    seen = nn.modules.module.register_module_forward_hook(lambda *args: calls.append("global"))
    try:
        model = nn.Sequential(layer, nn.ReLU())
        new, report = to_sparse(model, inplace=True, return_report=True)
    finally:
        seen.remove()
    assert calls == [], f"conversion ran hooks: {calls}"
    assert report.hooks == ["0"] and new is model and isinstance(model[0], SparseHetConv2d)
    model(torch.randn(1, 8, 4, 4, dtype=torch.float64))
    assert calls == ["pre", "SparseHetConv2d"], f"the hooks must run on the new layer, in order: {calls}"
    handle.remove()
    model(torch.randn(1, 8, 4, 4, dtype=torch.float64))
    assert calls == ["pre", "SparseHetConv2d", "pre"], "the user's handle must still remove the hook"


def test_hooks_that_cannot_follow_are_refused_before_anything_changes():
    layer = PublishedHetConv(8, 8, 2)
    layer.gwc.register_forward_hook(lambda *args: None)
    model = nn.Sequential(nn.ReLU(), layer)
    with pytest.raises(ValueError, match=r"module '1.gwc' has a forward hook, but it disappears when module '1' "
                                         r"\(PublishedHetConv\) is converted"):
        to_sparse(model, inplace=True)
    assert model[1] is layer
    masked = MaskedHetConv2d(8, 8, part=2)
    masked._register_state_dict_hook(lambda *args: None)
    with pytest.raises(ValueError, match=r"has a state_dict hook, which cannot follow it"):
        to_sparse(masked)
    with pytest.warns(FutureWarning, match="weight_norm"):
        conv = nn.utils.weight_norm(nn.Conv2d(8, 8, 3, padding=1))
    with pytest.raises(ValueError, match=r"hetconvify: the model cannot be deep-copied .*remove_weight_norm"):
        hetconvify(nn.Sequential(conv), part=2, skip_first=False, return_report=False)
    with pytest.raises(ValueError, match=r"module '0' \(Conv2d\) uses weight_norm \(torch.nn.utils.remove_weight_norm"):
        hetconvify(nn.Sequential(conv), part=2, skip_first=False, inplace=True, return_report=False)
    spectral = nn.utils.spectral_norm(nn.Conv2d(8, 8, 3, padding=1))
    with pytest.raises(ValueError, match=r"module '0' \(Conv2d\) uses spectral_norm"):
        hetconvify(nn.Sequential(spectral), part=2, skip_first=False, return_report=False)


# -- exactness of the lossy converters ------------------------------------------------------------------
def _block_mask(in_channels, out_channels, part, k=3):
    """Taps a block-pattern HetConv has (by definition, not through the library)."""
    mask = torch.zeros(out_channels, in_channels, k, k, dtype=torch.bool)
    m, n = in_channels // part, out_channels // part
    mask[:, :, k // 2, k // 2] = True
    for j in range(out_channels):
        g = j // n
        mask[j, g * m:(g + 1) * m] = True
    return mask


def _relative_change(conv, layer):
    x = torch.randn(1, conv.in_channels, 7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        old, new = conv.double()(x), layer.double()(x)
    return float((new - old).norm() / old.norm())


@pytest.mark.parametrize("reduce", ["center", "sum"])
def test_from_conv_reports_whether_it_is_exact(reduce):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1).double()
    layer, report = SparseHetConv2d.from_conv(conv, part=4, reduce=reduce, return_report=True)
    assert isinstance(report, ConversionReport) and report.converter == "from_conv" and not report.exact
    dropped, change = report.dropped[""]
    outside = conv.weight.detach().abs() * ~_block_mask(8, 12, 4)
    assert dropped == float(outside.max()), "largest dropped weight"
    assert change == pytest.approx(_relative_change(conv, layer), rel=1e-9) and change > 0
    with torch.no_grad():
        conv.weight.mul_(_block_mask(8, 12, 4))
    layer, report = SparseHetConv2d.from_conv(conv, part=4, reduce=reduce, return_report=True)
    assert report.exact and report.dropped == {} and "exact: no weight was dropped" in str(report)
    same_function(conv, layer, (1, 8, 6, 6), f"from_conv of a masked-trained conv, reduce={reduce}")
    assert isinstance(SparseHetConv2d.from_conv(conv, part=4), SparseHetConv2d), "return_report=False: the layer"


def test_hetconvify_reports_exactness_per_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).double()
    with torch.no_grad():
        model[2].weight.mul_(_block_mask(8, 8, 2))
    new, report = hetconvify(model, part=2, skip_first=False, return_report=True)
    assert report.replaced == ["0", "2"] and list(report.dropped) == ["0"], report
    assert report.dropped["0"][1] == pytest.approx(_relative_change(model[0], new[0]), rel=1e-9)
    assert not report.exact and report.relative_change == report.dropped["0"][1]
    assert "replaced 0 (dropped |w| <=" in str(report) and "NOT exact: 1 layers" in str(report)


@pytest.mark.parametrize("converter, layer", [
    (to_masked, lambda: SparseHetConv2d(8, 8, part=2)),
    (lambda m, **k: hetconvify(m, part=2, skip_first=False, return_report=False, **k),
     lambda: nn.Conv2d(8, 8, 3, padding=1)),
])
def test_hooks_follow_every_converter(converter, layer):
    calls = []
    model = nn.Sequential(layer())
    model[0].register_forward_hook(lambda module, args, out: calls.append(type(module).__name__))
    new = converter(model)
    assert calls == [], "conversion ran the hook"
    new(torch.randn(1, 8, 4, 4))
    assert len(calls) == 1 and calls[0] == type(new[0]).__name__ != type(model[0]).__name__, calls


def test_to_submanifold_keeps_shared_layers_shared():
    pytest.importorskip("spconv")
    from sparse_hetconv.submanifold import to_submanifold

    shared = SparseHetConv3d(8, 8, part=2)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    new = to_submanifold(model)
    assert new[0] is new[2] and type(new[0]).__name__ == "SubMHetConv3d", "one layer at two paths must stay one"


# -- property: every signed sum of grouped children is read exactly -----------------------------------
from hypothesis import given, strategies as st  # noqa: E402


class Sum(nn.Module):
    def __init__(self, children, signs):
        super().__init__()
        for i, child in enumerate(children):
            self.add_module(f"c{i}", child)
        self.signs = signs

    def forward(self, x):
        return sum(sign * child(x) for sign, child in zip(self.signs, self.children()))


_KXK = st.tuples(st.sampled_from([3, 5]), st.sampled_from([2, 4]), st.sampled_from([1, -1]), st.booleans())
_POINTWISE = st.tuples(st.just(1), st.sampled_from([1, 2, 4]), st.sampled_from([1, -1]), st.booleans())


@given(kxk=st.lists(_KXK, min_size=1, max_size=2), pointwise=st.lists(_POINTWISE, min_size=1, max_size=2),
       stride=st.sampled_from([1, 2]), seed=st.integers(0, 99))
def test_any_signed_sum_of_grouped_and_pointwise_convolutions_is_exact(kxk, pointwise, stride, seed):
    """(kernel, groups, sign, bias) per child: grouped k x k ones and pointwise ones of any groups."""
    torch.manual_seed(seed)
    terms = kxk + pointwise
    children = [nn.Conv2d(8, 12, k, stride, k // 2, groups=g, bias=b).double() for k, g, _, b in terms]
    source = Sum(children, [s for _, _, s, _ in terms])
    new, report = to_sparse(source, return_report=True)
    assert isinstance(new, SparseHetConv2d) and new.part == min(g for _, g, _, _ in kxk), report
    assert new.kernel_size == (max(k for k, _, _, _ in kxk),) * 2 and new.stride == (stride, stride)
    same_function(source, new, (1, 8, 7, 8), f"sum of {terms}")
