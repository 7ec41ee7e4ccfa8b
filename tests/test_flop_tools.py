"""FLOP tools on HetConv models: FlopCounterMode, fvcore and ptflops against ``count_macs``.

``count_macs`` (sparse_hetconv.counting) is the reference: ``executed=False`` gives the paper's
useful MACs, ``executed=True`` what the model's present form computes. FlopCounterMode reports
FLOPs (two per MAC) of the aten operations that run; fvcore and ptflops report MACs and, with the
handlers of ``sparse_hetconv.flop_tools``, count HetConv layers by the paper's convention.
All counts are integers and compared exactly.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from helpers import DEVICES
from sparse_hetconv import MaskedHetConv2d, MaskedHetConv3d, SparseHetConv2d, SparseHetConv3d, to_sparse
from sparse_hetconv.counting import count_macs, count_model
from helpers import BACKENDS
from sparse_hetconv.flop_tools import fvcore_analysis, fvcore_handles, ptflops_hooks
from sparse_hetconv.models import vgg16_cifar
from sparse_hetconv.sparse import _SparseHetConvNd

fvcore = pytest.importorskip("fvcore.nn", reason="fvcore is in the dev extra")
ptflops = pytest.importorskip("ptflops", reason="ptflops is in the dev extra")

FORMS = [b for b in BACKENDS if b != "auto"] + ["masked"]  # every concrete backend, and the masked form
INPUT = (2, 16, 8, 8)


def hetconv_net(form: str, dims: int = 2, bias: bool = False, channels_last: bool = False) -> nn.Sequential:
    """Two HetConv layers (P = 4 and P = 8, strides 1 and 2): nothing else that counts."""
    if form == "masked":
        cls = MaskedHetConv2d if dims == 2 else MaskedHetConv3d
        make = lambda *a, **k: cls(*a, **k, bias=bias)  # noqa: E731
    else:
        cls = SparseHetConv2d if dims == 2 else SparseHetConv3d
        make = lambda *a, **k: cls(*a, **k, bias=bias, backend=form)  # noqa: E731
    torch.manual_seed(0)
    net = nn.Sequential(make(16, 32, 4), make(32, 32, 8, stride=2))
    return net.to(memory_format=torch.channels_last) if channels_last else net


def hetconv_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (SparseHetConv2d, MaskedHetConv2d,
                                                                             SparseHetConv3d, MaskedHetConv3d))}


def masked_equivalent_macs(model: nn.Module, input_size) -> int:
    """MACs of the model with every HetConv layer's 1 x 1 part run as a full N x M product."""
    counts = count_model(model, input_size, norm=False)
    layers = hetconv_layers(model)
    total = 0
    for row in counts.layers:
        if row.name in layers:
            p = layers[row.name].pattern
            pixels = row.useful_macs // p.useful_macs_per_pixel()
            total += pixels * p.masked_macs_per_pixel()
        else:
            total += row.executed_macs
    return total


def flop_counter_macs(model: nn.Module, x: torch.Tensor, grad: bool) -> int:
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(grad):
        model(x)
    flops = counter.get_total_flops()
    assert flops % 2 == 0, f"FlopCounterMode counts 2 FLOPs per MAC, got an odd total {flops}"
    return flops // 2


# -- FlopCounterMode ------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("form", FORMS)
def test_flop_counter_mode_reports_what_executes(form, grad, channels_last, device):
    """FlopCounterMode / 2 equals count_macs(executed=True) for every backend but torch_sparse.

    torch_sparse: the counter prices the CSR product like a dense one (N x M per pixel), so it
    reports the masked form's MACs although only the N (M - m) stored kernels are multiplied.
    """
    model = hetconv_net(form, channels_last=channels_last).to(device).eval()
    x = torch.randn(INPUT, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    got = flop_counter_macs(model, x, grad)
    executed = count_macs(model, INPUT, executed=True, norm=False)
    useful = count_macs(model, INPUT, norm=False)
    if form == "torch_sparse":
        assert got == masked_equivalent_macs(model, INPUT), f"torch_sparse: FlopCounterMode gave {got} MACs"
        assert got > executed == useful, "torch_sparse executes the useful MACs only"
    else:
        assert got == executed, f"{form}: FlopCounterMode {got} MACs != count_macs(executed=True) {executed}"
    if form in ("dense", "masked"):
        assert executed > useful, f"{form} multiplies the zero block diagonal: executed must exceed useful"
    if form in ("grouped", "blocked"):
        assert executed == useful, f"{form} multiplies only the existing kernels"


@pytest.mark.parametrize("form", ["auto", "blocked", "masked"])
def test_flop_counter_mode_on_vgg16(form):
    """The whole VGG-16, channels-last (convolutions and linear layers; BatchNorm is counted by
    neither)."""
    model = vgg16_cifar(part=4, form="masked") if form == "masked" else vgg16_cifar(part=4, backend=form)
    model.eval()
    size = (2, 3, 32, 32)
    got = flop_counter_macs(model, torch.randn(size), grad=False)
    assert got == count_macs(model, size, executed=True, norm=False), f"{form} VGG-16: FlopCounterMode {got}"


# -- fvcore ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS + ["auto"])
def test_fvcore_counts_hetconv_layers_by_the_paper(form):
    model = hetconv_net(form)
    x = torch.randn(INPUT)
    analysis = fvcore_analysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    expected = count_macs(model, INPUT, norm=False)
    assert analysis.total() == expected, f"{form}: fvcore {analysis.total()} MACs, paper's count {expected}"
    by_module = analysis.by_module()
    for row in count_model(model, INPUT, norm=False).layers:
        assert by_module[row.name] == row.useful_macs, f"{form}: layer {row.name}: fvcore {by_module[row.name]}"


@pytest.mark.parametrize("form", ["dense", "blocked", "masked"])
def test_fvcore_counts_3d_and_bias(form):
    model = hetconv_net(form, dims=3, bias=True)
    x = torch.randn(2, 16, 4, 6, 6)
    analysis = fvcore_analysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    expected = count_macs(model, x.shape, norm=False)  # fvcore, like count_macs, counts no bias additions
    assert analysis.total() == expected, f"3-D {form}: fvcore {analysis.total()} MACs, paper's count {expected}"


def test_fvcore_without_handles_counts_the_masked_zeros():
    """Why the handles exist: plain fvcore counts what the masked form executes."""
    model = hetconv_net("masked")
    x = torch.randn(INPUT)
    plain = fvcore.FlopCountAnalysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert plain.total() == count_macs(model, INPUT, executed=True, norm=False) > count_macs(model, INPUT, norm=False)


def test_fvcore_handles_defer_elsewhere():
    """Layers that are not HetConv keep fvcore's own counts; a direct het_conv call is counted too."""
    from sparse_hetconv.functional import het_conv2d

    class Direct(nn.Module):  # the functional form inside a plain module: no HetConv layer to see
        def __init__(self):
            super().__init__()
            self.weight_kxk = nn.Parameter(torch.randn(8, 2, 3, 3))
            self.weight_1x1 = nn.Parameter(torch.randn(8, 6))
            self.conv = nn.Conv2d(8, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 5 * 5, 3)

        def forward(self, x):
            y = het_conv2d(x, self.weight_kxk, self.weight_1x1, part=4, backend="torch_sparse")
            return self.fc(self.conv(y).flatten(1))

    model = Direct()
    x = torch.randn(2, 8, 5, 5)
    ours = fvcore_analysis(model, x).unsupported_ops_warnings(False)
    plain = fvcore.FlopCountAnalysis(model, x).unsupported_ops_warnings(False)
    assert ours.by_module()["conv"] == plain.by_module()["conv"] == 2 * 25 * 4 * 8 * 9
    assert ours.by_module()["fc"] == plain.by_module()["fc"] == 2 * 100 * 3
    # het_conv2d's CSR product outside a layer: the stored values (8 x 6) times 2 x 25 columns.
    assert ours.total() - plain.total() == 8 * 6 * 2 * 25, "the torch_sparse product must be counted"
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fvcore_handles("vgg")


@pytest.mark.parametrize("form", ["sparse", "masked"])
def test_fvcore_on_vgg16(form):
    model = vgg16_cifar(part=4, form=form)
    size = (2, 3, 32, 32)
    analysis = fvcore_analysis(model, torch.randn(size)).unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    by_module = analysis.by_module()
    rows = [row for row in count_model(model, size, norm=False).layers if row.kind not in ("BatchNorm2d", "BatchNorm1d")]
    assert len(rows) == 15, "13 convolutions and 2 linear layers"
    for row in rows:
        assert by_module[row.name] == row.useful_macs, f"{form} VGG-16 {row.name}: fvcore {by_module[row.name]}"


# -- ptflops --------------------------------------------------------------------------------------
def ptflops_macs(model: nn.Module, input_res, hooks: bool) -> int:
    macs, _ = ptflops.get_model_complexity_info(
        model, input_res, as_strings=False, print_per_layer_stat=False, verbose=False, ost=io.StringIO(),
        custom_modules_hooks=ptflops_hooks() if hooks else {},
    )
    assert macs is not None, "ptflops failed (it prints the exception and returns None)"
    return macs


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("form", FORMS + ["auto"])
def test_ptflops_counts_hetconv_layers_by_the_paper(form, bias):
    model = hetconv_net(form, bias=bias)
    got = ptflops_macs(model, INPUT[1:], hooks=True)
    expected = count_macs(model, (1,) + INPUT[1:], norm=False)
    if bias:  # ptflops adds one operation per output element for a convolution's bias
        expected += 32 * 8 * 8 + 32 * 4 * 4
    assert got == expected, f"{form}: ptflops {got} MACs, expected {expected}"


def test_ptflops_3d():
    for form in ("dense", "masked"):
        model = hetconv_net(form, dims=3)
        got = ptflops_macs(model, (16, 4, 6, 6), hooks=True)
        assert got == count_macs(model, (1, 16, 4, 6, 6), norm=False), f"3-D {form}: ptflops {got}"


def test_ptflops_on_vgg16():
    """With the hooks both forms count the same; without them ptflops undercounts both."""
    masked = vgg16_cifar(part=4, form="masked")
    sparse = to_sparse(masked)
    res, size = (3, 32, 32), (1, 3, 32, 32)
    with_hooks = ptflops_macs(sparse, res, hooks=True)
    assert with_hooks == ptflops_macs(masked, res, hooks=True), "masked and sparse forms must count the same"
    rows = {row.name: row for row in count_model(sparse, size).layers}
    layers = {name: m for name, m in sparse.named_modules() if isinstance(m, _SparseHetConvNd)}
    # Masked form without hooks: ptflops sees gwc only (the layer runs pwc's weight through
    # pwc._conv_forward, so pwc's hook never fires): every 1 x 1 part is missing.
    one_by_one = sum(rows[name].useful_macs // m.pattern.useful_macs_per_pixel() * m.out_channels * m.pattern.num_1x1
                     for name, m in layers.items())
    assert with_hooks - ptflops_macs(masked, res, hooks=False) == one_by_one > 0
    # Sparse form without hooks: ptflops does not know the layer and counts it as nothing.
    hetconv = sum(rows[name].useful_macs for name in layers)
    assert with_hooks - ptflops_macs(sparse, res, hooks=False) == hetconv > 0
