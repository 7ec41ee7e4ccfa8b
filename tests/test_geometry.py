"""The layers as a drop-in for ``nn.Conv2d``: ``padding=``, ``dilation=`` and ``padding_mode=``
(sparse_hetconv/_base.py, _checks.py), on every backend and on the masked layer, forward and
backward against the float64 definition oracle; the masked and sparse layers against each other;
the converters carrying the geometry through (or refusing, with the reason); the errors.

A ``padding_mode`` other than zeros is ``nn.Conv2d``'s own definition: the input padded by
``F.pad`` in that mode, then the convolution with padding 0. The oracle gets that padded input.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_agrees, masked_reference_weights, oracle
from sparse_hetconv import (MaskedHetConv2d, MaskedHetConv3d, SparseHetConv2d, SparseHetConv3d, hetconvify,
                            to_masked, to_sparse)
from sparse_hetconv.backends import BACKENDS, available
from sparse_hetconv.shifted import from_shifted, to_shifted

MODES = ("zeros", "reflect", "replicate", "circular")
CPU_BACKENDS = [b for b in BACKENDS if b != "triton"]
# (kernel_size, stride, padding, dilation): centre taps aligned at full padding, partial padding,
# "valid", "same" with a dilation per dimension.
GEOMETRIES = {
    "dilation2": (3, 1, None, 2),
    "partial": ((3, 5), (2, 1), (1, 1), (1, 2)),
    "valid": (3, 1, "valid", 1),
    "same": (3, 1, "same", (2, 1)),
}


def full_padding(kernel, dilation, dims=2):
    kernel = (kernel,) * dims if isinstance(kernel, int) else kernel
    dilation = (dilation,) * dims if isinstance(dilation, int) else dilation
    return tuple(d * (k // 2) for k, d in zip(kernel, dilation))


def padding_of(kernel, padding, dilation, dims=2):
    if padding is None or padding == "same":
        return full_padding(kernel, dilation, dims)
    if padding == "valid":
        return (0,) * dims
    return (padding,) * dims if isinstance(padding, int) else tuple(padding)


def reference(x, weights, stride, part, padding, dilation, mode):
    """The oracle for a layer of this geometry: ``nn.Conv2d``'s padding modes pad the input first."""
    if mode != "zeros" and any(padding):
        x = F.pad(x, [p for size in reversed(padding) for p in (size, size)], mode=mode)
        padding = (0,) * len(padding)
    return oracle(x, *weights, stride, part, padding, dilation)


def check_layer(layer, x, weights_of, what, tol=1e-12):
    """Forward and backward (input and every parameter) against the oracle, in float64."""
    x = x.clone().requires_grad_()
    out = layer(x)
    params = dict(layer.named_parameters())
    x_ref = x.detach().clone().requires_grad_()
    ref_params = {name: p.detach().clone().requires_grad_() for name, p in params.items()}
    expected = reference(x_ref, weights_of(ref_params), layer.stride, layer.part, layer.padding, layer.dilation,
                         layer.padding_mode)
    assert_agrees(out, expected, f"{what}: output", tol)
    u = torch.randn_like(expected)
    got = torch.autograd.grad((out * u).sum(), [x, *params.values()])
    wanted = torch.autograd.grad((expected * u).sum(), [x_ref, *ref_params.values()], allow_unused=True)
    for name, g, e in zip(["input", *params], got, wanted):
        assert_agrees(g, torch.zeros_like(g) if e is None else e, f"{what}: gradient of {name}", tol)


def sparse_weights(p):
    return p["weight_kxk"], p.get("weight_1x1"), p.get("bias")


def masked_weights(p):
    class View:  # masked_reference_weights reads a module's gwc/pwc
        pass

    view = View()
    view.gwc, view.pwc = View(), View()
    view.gwc.weight, view.gwc.bias, view.pwc.weight = p["gwc.weight"], p.get("gwc.bias"), p["pwc.weight"]
    view.out_channels, view.in_channels, view.part = p["gwc.weight"].shape[0], M, P
    return masked_reference_weights(view)


M, N, P = 4, 6, 2


def make(form, geometry, mode, dims=2, backend="auto", bias=True):
    kernel, stride, padding, dilation = GEOMETRIES[geometry] if isinstance(geometry, str) else geometry
    kwargs = dict(bias=bias, dtype=torch.float64, padding=padding, dilation=dilation, padding_mode=mode)
    torch.manual_seed(0)
    if form == "masked":
        return (MaskedHetConv2d if dims == 2 else MaskedHetConv3d)(M, N, P, kernel, stride, **kwargs)
    return (SparseHetConv2d if dims == 2 else SparseHetConv3d)(M, N, P, kernel, stride, backend=backend, **kwargs)


def test_a_layer_with_the_default_geometry_is_unchanged():
    layer = SparseHetConv2d(M, N, P)
    assert (layer.padding, layer.dilation, layer.padding_mode) == ((1, 1), (1, 1), "zeros"), "defaults changed"
    assert layer.default_geometry, "default_geometry should be True for the defaults"
    for padding in (1, (1, 1), "same"):
        assert SparseHetConv2d(M, N, P, padding=padding).padding == (1, 1), f"padding={padding!r} is k // 2"
    assert SparseHetConv2d(M, N, P, 5, dilation=3).padding == (6, 6), "the default padding follows the dilation"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("form", CPU_BACKENDS + ["masked"])
def test_every_backend_and_padding_mode_matches_the_oracle(form, geometry, mode):
    """Forward and backward of every backend (and the masked layer) for each geometry and padding
    mode, in float64, against the oracle; channels-last input too for the first geometry."""
    layer = make(form, geometry, mode, backend=form if form != "masked" else "auto")
    x = torch.randn(2, M, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights = masked_weights if form == "masked" else sparse_weights
    check_layer(layer, x, weights, f"{form}, {geometry}, padding_mode={mode!r}")
    if geometry == "dilation2":
        check_layer(layer, x.contiguous(memory_format=torch.channels_last), weights,
                    f"{form}, {geometry}, padding_mode={mode!r}, channels-last input")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", ["auto", "blocked", "masked"])
def test_3d_layers_take_the_same_geometry(form, mode):
    layer = make(form, (3, (1, 2, 1), (1, 0, 2), (1, 1, 2)), mode, dims=3, backend=form)
    x = torch.randn(1, M, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    check_layer(layer, x, masked_weights if form == "masked" else sparse_weights, f"3-D {form}, {mode}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_masked_and_sparse_layers_compute_the_same_and_convert_both_ways(geometry, mode):
    masked = make("masked", geometry, mode)
    sparse = SparseHetConv2d.from_masked(masked)
    assert (sparse.padding, sparse.dilation, sparse.padding_mode) == (masked.padding, masked.dilation, mode), \
        "from_masked lost the geometry"
    back = sparse.to_masked()
    assert (back.padding, back.dilation, back.padding_mode) == (masked.padding, masked.dilation, mode), \
        "to_masked lost the geometry"
    x = torch.randn(2, M, 7, 8, dtype=torch.float64)
    for name, layer in (("sparse", sparse), ("masked again", back)):
        torch.testing.assert_close(layer(x), masked(x), rtol=1e-12, atol=1e-12,
                                   msg=lambda m, name=name: f"{name} vs masked, {geometry}, {mode}: {m}")
    net = to_masked(to_sparse(nn.Sequential(masked)))
    torch.testing.assert_close(net(x), masked(x), rtol=1e-12, atol=1e-12,
                               msg=lambda m: f"to_masked(to_sparse(...)), {geometry}, {mode}: {m}")
    assert set(sparse.state_dict()) == {"weight_kxk", "weight_1x1", "bias"}, "the geometry must not enter state_dict"


@pytest.mark.parametrize("mode", MODES)
def test_from_conv_hetconvify_and_shifted_carry_dilation_padding_and_mode(mode):
    """A dense convolution trained under a HetConv mask converts exactly with its geometry, through
    from_conv, hetconvify (both forms), to_shifted and back."""
    torch.manual_seed(3)
    source = SparseHetConv2d(8, 8, 4, bias=True, dtype=torch.float64)
    conv = nn.Conv2d(8, 8, 3, padding=2, dilation=2, padding_mode=mode, bias=True, dtype=torch.float64)
    with torch.no_grad():  # a HetConv as a dense convolution: the dropped taps are zero (the exact case)
        dense = torch.zeros_like(conv.weight)
        for g in range(4):
            dense[2 * g:2 * g + 2, 2 * g:2 * g + 2] = source.weight_kxk[2 * g:2 * g + 2]
        dense[:, :, 1, 1] += source.dense_1x1()
        conv.weight.copy_(dense)
        conv.bias.copy_(source.bias)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    layer, report = SparseHetConv2d.from_conv(conv, 4, return_report=True)
    assert report.exact, f"from_conv of a HetConv-shaped convolution is exact: {report}"
    assert (layer.padding, layer.dilation, layer.padding_mode) == ((2, 2), (2, 2), mode), "geometry not carried"
    torch.testing.assert_close(layer(x), conv(x), msg=lambda m: f"from_conv, {mode}: {m}")
    for form in ("sparse", "masked"):
        net = hetconvify(nn.Sequential(conv), 4, form, skip_first=False, return_report=False)
        torch.testing.assert_close(net(x), conv(x), msg=lambda m, form=form: f"hetconvify {form}, {mode}: {m}")
        shifted = to_shifted(net)
        dense = next(m for m in shifted.modules() if isinstance(m, nn.Conv2d))
        assert dense.dilation == (2, 2) and dense.padding_mode == mode, "to_shifted lost the geometry"
        torch.testing.assert_close(shifted(x), conv(x), msg=lambda m, form=form: f"to_shifted {form}, {mode}: {m}")
        again = from_shifted(shifted, part=4, skip_first=False)
        torch.testing.assert_close(again(x), conv(x), msg=lambda m, form=form: f"from_shifted {form}, {mode}: {m}")


def test_converters_skip_convolutions_they_cannot_convert_exactly_and_say_why():
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=2), nn.Conv2d(8, 8, 3, padding=1, dilation=3))
    _, report = hetconvify(net, 4, skip_first=False, return_report=True)
    assert "0" in report.skipped and "more than dilation * (kernel_size // 2)" in report.skipped["0"], \
        f"padding 2 at dilation 1 must be skipped with the reason: {report.skipped}"
    assert report.replaced == ["1"], f"padding 1 at dilation 3 (partial) converts: {report.replaced}"
    with pytest.raises(ValueError, match=r"padding \(2, 2\) is more than"):
        SparseHetConv2d.from_conv(net[0], 4)


def test_extra_repr_shows_only_non_default_geometry():
    assert "padding" not in repr(SparseHetConv2d(M, N, P, dilation=2)), "padding = dilation * (k // 2) is default"
    text = repr(SparseHetConv2d(M, N, P, 3, padding="valid", dilation=(1, 2), padding_mode="circular"))
    for part in ("padding=0", "dilation=(1, 2)", "padding_mode='circular'"):
        assert part in text, f"{part} missing from {text}"
    assert "padding_mode" in repr(MaskedHetConv2d(M, N, P, padding_mode="reflect")), "masked repr"


@pytest.mark.parametrize("cls", [SparseHetConv2d, MaskedHetConv2d])
@pytest.mark.parametrize("kwargs, match", [
    ({"padding": 2}, r"padding \(2\) must be at most dilation \* \(kernel_size // 2\) = 1"),
    ({"padding": (1, -1)}, r"padding \(-1\) must be an int >= 0"),
    ({"padding": "full"}, r"padding \('full'\) must be 'same', 'valid'"),
    ({"padding": 1.0}, r"padding \(1.0\) must be 'same', 'valid'"),
    ({"padding": "same", "stride": 2}, r"padding='same' needs stride 1"),
    ({"dilation": 0}, r"dilation \(0\) must be an int >= 1"),
    ({"padding_mode": "mirror"}, r"padding_mode \('mirror'\) must be one of"),
    ({"padding_mode": None}, r"padding_mode \(None\) must be one of"),
])
def test_what_hetconv_cannot_compute_is_a_value_error_before_any_work(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(M, N, P, **kwargs)


def test_the_triton_backend_is_refused_for_geometry_it_does_not_compute():
    with pytest.raises(ValueError, match=r"backend 'triton' computes padding kernel_size // 2"):
        SparseHetConv2d(M, N, P, dilation=2, backend="triton")
    layer = SparseHetConv2d(M, N, P, padding_mode="reflect")
    with pytest.raises(ValueError, match=r"backend 'triton'.*padding_mode='reflect'"):
        layer.backend = "triton"
    assert layer.backend == "auto", "a refused backend must leave the layer unchanged"


@pytest.mark.skipif(not available("triton"), reason="backend 'triton' needs triton (CUDA or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("padding", ["same", 1])
def test_the_triton_backend_takes_padding_same(padding):
    """Tiny: Triton's CPU interpreter is slow."""
    layer = SparseHetConv2d(4, 4, 2, bias=True, backend="triton", dtype=torch.float64, padding=padding)
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64)
    check_layer(layer, x, sparse_weights, f"triton, padding={padding!r}", 1e-10)


def test_forms_that_compute_only_the_default_geometry_refuse_the_rest():
    """The export forms and the submanifold layer are built for padding k // 2, dilation 1 and zero
    padding: they refuse another geometry rather than drop it."""
    from sparse_hetconv.deploy.forms import ExportHetConv2d

    layer = SparseHetConv2d(M, N, P, dilation=2)
    with pytest.raises(ValueError, match=r"the export forms are built for padding kernel_size // 2"):
        ExportHetConv2d(layer)
    pytest.importorskip("spconv.pytorch", reason="the spconv extra is not installed")
    from sparse_hetconv.submanifold import SubMHetConv2d

    with pytest.raises(ValueError, match=r"a submanifold convolution computes padding kernel_size // 2"):
        SubMHetConv2d.from_dense(layer)


def dilated_net() -> nn.Module:
    """A factory of the test's own (for ``load_model("test_geometry:dilated_net")``)."""
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2, padding_mode="reflect"), nn.ReLU(),
                         nn.Conv2d(8, 8, 5, padding="same", padding_mode="circular"))


@pytest.mark.parametrize("form", ["sparse", "masked"])
def test_a_checkpoint_of_a_hetconvified_model_comes_back_with_its_geometry(form, tmp_path):
    """hetconvify(factory()) -> state_dict -> load_model with the original factory: the layers are
    rebuilt by hetconvify from the factory's convolutions, so dilation and padding mode come back."""
    from sparse_hetconv.checkpoint import load_model

    net = hetconvify(dilated_net(), 4, form, skip_first=False, return_report=False)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)  # not what the factory builds
    path = tmp_path / "net.pt"
    torch.save(net.state_dict(), path)
    loaded, _ = load_model(str(path), "test_geometry:dilated_net")
    layers = [m for m in loaded.modules() if isinstance(m, (SparseHetConv2d, MaskedHetConv2d))]
    assert [(m.dilation, m.padding_mode) for m in layers] == [((2, 2), "reflect"), ((1, 1), "circular")], \
        f"the loaded layers lost their geometry: {layers}"
    x = torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(loaded.eval()(x), net.eval()(x), msg=lambda m: f"{form} reloaded: {m}")
