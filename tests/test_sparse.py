"""SparseHetConv2d as a module: parameters, views of the 1x1 part, scipy, errors, repr."""

import math

import pytest
import torch

from helpers import DEVICES, assert_close, one_by_one_channels, oracle
from sparse_hetconv import MaskedHetConv2d, MaskedHetConv3d, SparseHetConv2d, SparseHetConv3d


def test_parameters_are_only_the_existing_kernels():
    layer = SparseHetConv2d(256, 128, part=4, bias=True)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {"weight_kxk": (128, 64, 3, 3), "weight_1x1": (128, 192), "bias": (128,)}, shapes
    assert sum(p.numel() for p in layer.parameters()) == layer.pattern.num_params(bias=True)
    assert list(layer.state_dict()) == ["weight_kxk", "weight_1x1", "bias"], "no index tensors in the state"
    assert list(layer.buffers()) == [], "the pattern's indices must not be module state"


def test_bias_registered_as_none():
    layer = SparseHetConv2d(8, 8, part=2)
    assert layer.bias is None and "bias" in dict(layer._parameters), "bias must be registered as None"


def test_reset_parameters_bound_uses_real_fan_in():
    torch.manual_seed(0)
    layer = SparseHetConv2d(64, 64, part=4, bias=True)
    bound = 1 / math.sqrt(9 * 16 + 48)
    for name in ("weight_kxk", "weight_1x1", "bias"):
        values = getattr(layer, name)
        assert values.abs().max() <= bound, f"{name} exceeds the init bound"
        assert values.abs().max() > 0.9 * bound, f"{name} does not span the init bound"


def test_extra_repr_lists_non_default_settings_only():
    assert repr(SparseHetConv2d(16, 32, part=4)) == "SparseHetConv2d(16, 32, part=4)"
    text = repr(SparseHetConv2d(16, 32, part=4, kernel_size=5, stride=2, bias=True, backend="blocked"))
    assert text == "SparseHetConv2d(16, 32, part=4, kernel_size=5, stride=2, bias=True, backend='blocked')"
    assert "kernel_size" not in repr(SparseHetConv3d(4, 4, part=2))


def test_factory_kwargs():
    layer = SparseHetConv2d(8, 8, part=2, bias=True, dtype=torch.float64, device="cpu")
    assert {p.dtype for p in layer.parameters()} == {torch.float64}


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(in_channels=10, out_channels=8, part=4), ValueError, r"in_channels \(10\) must be divisible by part \(4\)"),
    (dict(in_channels=8, out_channels=8, part=2, kernel_size=2), ValueError, r"kernel_size \(2\) must be odd"),
    (dict(in_channels=8, out_channels=8, part=0), ValueError, r"part \(0\) must be an int >= 1"),
    (dict(in_channels=8, out_channels=8, part=2, stride=0), ValueError, r"stride \(0\) must be an int >= 1"),
    (dict(in_channels=8, out_channels=8, part=2, backend="cuda"), ValueError, r"backend \('cuda'\) must be one of"),
    (dict(in_channels=8.0, out_channels=8, part=2), TypeError, r"in_channels must be an int, got float"),
    (dict(in_channels=8, out_channels=8, part=2, stride=(1, 1, 1)), ValueError,
     r"stride \(\(1, 1, 1\)\) must be an int or a sequence of 2 ints"),
    (dict(in_channels=8, out_channels=8, part=True), TypeError, r"part must be an int, got bool"),
])
def test_constructor_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        SparseHetConv2d(**kwargs)


def _layer_types():
    """Every HetConv layer class whose constructor takes bias, device and dtype."""
    types = [SparseHetConv2d, SparseHetConv3d, MaskedHetConv2d, MaskedHetConv3d]
    try:
        from sparse_hetconv.submanifold import SubMHetConv2d, SubMHetConv3d
    except ImportError:  # the spconv extra is not installed
        return types
    return types + [SubMHetConv2d, SubMHetConv3d]


# bias="no" used to build a bias (any truthy value did); dtype / device errors came from deep in torch.
@pytest.mark.parametrize("cls", _layer_types(), ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(bias="no"), TypeError, r"bias must be a bool, got str \('no'\)"),
    (dict(bias=1), TypeError, r"bias must be a bool, got int \(1\)"),
    (dict(bias=None), TypeError, r"bias must be a bool, got NoneType"),
    (dict(dtype="float64"), TypeError, r"dtype must be a torch.dtype or None, got str \('float64'\)"),
    (dict(dtype=torch.int64), ValueError, r"dtype \(torch.int64\) must be a floating-point or complex torch.dtype"),
    (dict(device="gpu"), ValueError, r"device \('gpu'\) is not a torch device, expected e.g. 'cpu'"),
    (dict(device=2.5), TypeError, r"device must be a torch.device, a str, an int or None, got float \(2.5\)"),
], ids=["bias-str", "bias-int", "bias-none", "dtype-str", "dtype-int64", "device-name", "device-float"])
def test_every_layer_checks_bias_device_and_dtype(cls, kwargs, error, message):
    with pytest.raises(error, match=message):
        cls(8, 8, 2, **kwargs)


@pytest.mark.parametrize("cls", _layer_types(), ids=lambda cls: cls.__name__)
def test_every_layer_takes_the_bool_bias_and_factory_arguments_it_is_given(cls):
    with_bias = cls(8, 8, 2, bias=True, device=torch.device("cpu"), dtype=torch.float64)
    without = cls(8, 8, 2, bias=False, device="cpu")
    bias_of = lambda layer: layer.gwc.bias if hasattr(layer, "gwc") else layer.bias  # noqa: E731
    assert bias_of(with_bias) is not None and bias_of(without) is None, f"{cls.__name__}: bias not as asked"
    assert {p.dtype for p in with_bias.parameters()} == {torch.float64}, f"{cls.__name__}: dtype not applied"


def test_input_errors_name_expected_and_given():
    layer = SparseHetConv2d(8, 8, part=2)
    with pytest.raises(ValueError, match=r"expects input with 8 channels \(dim 1\), got 6"):
        layer(torch.randn(1, 6, 4, 4))
    with pytest.raises(ValueError, match=r"expects a 4-D input .*got a 3-D input of shape \(8, 4, 4\)"):
        layer(torch.randn(8, 4, 4))
    with pytest.raises(TypeError, match=r"expects input to be a torch.Tensor, got list"):
        layer([1, 2])
    with pytest.raises(ValueError, match=r"SparseHetConv3d expects a 5-D input"):
        SparseHetConv3d(8, 8, part=2)(torch.randn(1, 8, 4, 4))


def test_backend_can_be_pinned_and_checked():
    layer = SparseHetConv2d(8, 8, part=2)
    layer.backend = "torch_sparse"
    assert layer.backend == "torch_sparse"
    with pytest.raises(ValueError, match=r"backend \('fastest'\) must be one of"):
        layer.backend = "fastest"
    assert layer.backend == "torch_sparse", "a rejected assignment must not change the backend"


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_weight_csr_is_a_view_of_the_values(device):
    layer = SparseHetConv2d(8, 12, part=4, device=device)
    csr = layer.sparse_weight()
    assert csr.layout == torch.sparse_csr and csr.shape == (12, 8)
    assert_close(csr.to_dense(), layer.dense_1x1(), "CSR view vs dense_1x1")
    assert csr.values().data_ptr() == layer.weight_1x1.data_ptr(), "CSR values must share storage"
    with torch.no_grad():
        layer.weight_1x1[3, 2] = 42.0
    assert float(layer.sparse_weight().to_dense()[3, one_by_one_channels(3, 8, 12, 4)[2]]) == 42.0
    for j in range(12):
        row = csr.to_dense()[j]
        assert torch.equal(row[one_by_one_channels(j, 8, 12, 4)], layer.weight_1x1[j].detach()), f"row {j}"


def test_sparse_weight_coo_and_bad_layout():
    layer = SparseHetConv2d(8, 4, part=2)
    coo = layer.sparse_weight(torch.sparse_coo)
    assert coo.layout == torch.sparse_coo and coo.is_coalesced()
    assert torch.equal(coo.to_dense(), layer.dense_1x1())
    with pytest.raises(ValueError, match=r"layout \(torch.strided\) must be torch.sparse_csr or torch.sparse_coo"):
        layer.sparse_weight(torch.strided)


def test_sparse_weight_times_input_is_the_1x1_part():
    torch.manual_seed(0)
    layer = SparseHetConv2d(8, 8, part=4, dtype=torch.float64)
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        layer.weight_kxk.zero_()
        cols = x.movedim(1, 0).reshape(8, -1)
        expected = (layer.sparse_weight() @ cols).view(8, 2, 3, 3).movedim(0, 1)
        assert_close(layer(x), expected, "CSR product vs layer with zero k x k part")


def test_scipy_round_trip():
    np = pytest.importorskip("numpy", reason="scipy interop needs numpy")
    scipy = pytest.importorskip("scipy", reason="scipy interop needs scipy")
    import scipy.sparse  # noqa: F401

    torch.manual_seed(0)
    layer = SparseHetConv2d(12, 6, part=3, dtype=torch.float64)
    matrix = layer.to_scipy()
    assert isinstance(matrix, scipy.sparse.csr_array) and matrix.shape == (6, 12)
    assert matrix.nnz == 6 * 8, "one stored entry per existing 1x1 kernel"
    np.testing.assert_array_equal(matrix.toarray(), layer.dense_1x1().numpy())
    other = SparseHetConv2d(12, 6, part=3, dtype=torch.float64)
    assert other.load_scipy(matrix) is other
    assert torch.equal(other.weight_1x1, layer.weight_1x1), "load_scipy(to_scipy()) must give the values back"
    # Any scipy format; missing entries are zero weights; stored zeros on the diagonal are fine.
    dense = matrix.toarray()
    dense[0, 4] = 0.0
    coo = scipy.sparse.coo_matrix(dense)
    other.load_scipy(coo)
    assert float(other.dense_1x1()[0, 4]) == 0.0


def test_load_scipy_rejects_what_does_not_fit_and_changes_nothing():
    np = pytest.importorskip("numpy", reason="scipy interop needs numpy")
    scipy = pytest.importorskip("scipy", reason="scipy interop needs scipy")
    import scipy.sparse  # noqa: F401

    layer = SparseHetConv2d(8, 4, part=2)
    before = layer.weight_1x1.detach().clone()
    bad = layer.to_scipy().toarray()
    bad[3, 5] = 1.5  # filter 3 is in group 1, whose k x k block is channels 4..7
    with pytest.raises(ValueError, match=r"block diagonal, first at \(row 3, col 5\).*channels 4\.\.7"):
        layer.load_scipy(scipy.sparse.csr_array(bad))
    with pytest.raises(ValueError, match=r"matrix has shape \(4, 6\), expected \(4, 8\)"):
        layer.load_scipy(scipy.sparse.csr_array(np.ones((4, 6))))
    with pytest.raises(TypeError, match=r"matrix must be a scipy.sparse matrix or array, got ndarray"):
        layer.load_scipy(np.ones((4, 8)))
    assert torch.equal(layer.weight_1x1, before), "a rejected matrix must leave the weights alone"


def test_to_scipy_bfloat16_and_part_one():
    np = pytest.importorskip("numpy", reason="scipy interop needs numpy")
    pytest.importorskip("scipy", reason="scipy interop needs scipy")

    layer = SparseHetConv2d(8, 4, part=2, dtype=torch.bfloat16)
    assert layer.to_scipy().dtype == np.float32
    standard = SparseHetConv2d(4, 4, part=1)
    assert standard.to_scipy().nnz == 0 and standard.sparse_weight().shape == (4, 4)


def test_masked_round_trip_is_exact():
    torch.manual_seed(0)
    layer = SparseHetConv2d(16, 8, part=4, stride=2, bias=True).eval()
    masked = layer.to_masked()
    assert isinstance(masked, MaskedHetConv2d) and not masked.training
    back = SparseHetConv2d.from_masked(masked)
    for name, value in layer.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), f"{name} changed in the round trip"
    x = torch.randn(2, 16, 7, 7)
    assert_close(masked(x), layer(x), "masked vs sparse output", rtol=1e-5, atol=1e-6)


def test_from_masked_rejects_wrong_dimension():
    with pytest.raises(ValueError, match=r"SparseHetConv3d.from_masked expects a 3-D HetConv, got a 2-D one"):
        SparseHetConv3d.from_masked(MaskedHetConv2d(8, 8, part=2))


@pytest.mark.parametrize("reduce", ["center", "sum"])
def test_from_conv_keeps_block_kernels_and_reduces_the_rest(reduce):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 4, 3, stride=2, padding=1, bias=True)
    layer = SparseHetConv2d.from_conv(conv, part=2, reduce=reduce)
    assert layer.stride == (2, 2) and layer.bias is not None
    w = conv.weight.detach()
    for j in range(4):
        g = j // 2
        assert torch.equal(layer.weight_kxk[j], w[j, g * 4:(g + 1) * 4]), f"filter {j} k x k kernels changed"
        for t, c in enumerate(one_by_one_channels(j, 8, 4, 2)):
            expected = w[j, c, 1, 1] if reduce == "center" else w[j, c].sum()
            assert torch.allclose(layer.weight_1x1[j, t], expected), f"filter {j} channel {c}"
    assert torch.equal(layer.bias, conv.bias)


def test_from_conv_errors():
    with pytest.raises(ValueError, match=r"groups is 2, expected 1"):
        SparseHetConv2d.from_conv(torch.nn.Conv2d(8, 8, 3, padding=1, groups=2), part=2)
    with pytest.raises(ValueError, match=r"padding \(2, 2\) is more than dilation \* \(kernel_size // 2\)"):
        SparseHetConv2d.from_conv(torch.nn.Conv2d(8, 8, 3, padding=2), part=2)
    with pytest.raises(ValueError, match=r"in_channels \(6\) is not divisible by part \(4\)"):
        SparseHetConv2d.from_conv(torch.nn.Conv2d(6, 8, 3, padding=1), part=4)
    with pytest.raises(TypeError, match=r"conv must be an Conv2d, got Linear"):
        SparseHetConv2d.from_conv(torch.nn.Linear(4, 4), part=2)
    with pytest.raises(ValueError, match=r"reduce \('mean'\) must be one of"):
        SparseHetConv2d.from_conv(torch.nn.Conv2d(8, 8, 3, padding=1), part=2, reduce="mean")


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4),
    lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.05),
], ids=["sgd_momentum_wd", "adamw"])
def test_stock_optimizer_trains_the_layer_as_the_definition_trains(make_optimizer):
    """The layer, trained by a stock optimizer, follows the trajectory of the definition's own
    parameters (the oracle, differentiated by autograd) trained by the same optimizer."""
    torch.manual_seed(0)
    layer = SparseHetConv2d(8, 8, part=4, bias=True, dtype=torch.float64)
    reference = [p.detach().clone().requires_grad_(True) for p in (layer.weight_kxk, layer.weight_1x1, layer.bias)]
    opt, ref_opt = make_optimizer(layer.parameters()), make_optimizer(reference)
    x, target = torch.randn(4, 8, 5, 5, dtype=torch.float64), torch.randn(4, 8, 5, 5, dtype=torch.float64)
    for step in range(5):
        opt.zero_grad()
        (layer(x) - target).square().mean().backward()
        opt.step()
        ref_opt.zero_grad()
        (oracle(x, *reference, 1, 4) - target).square().mean().backward()
        ref_opt.step()
        for name, mine, theirs in zip(("weight_kxk", "weight_1x1", "bias"), layer.parameters(), reference):
            assert_close(mine, theirs, f"{name} after step {step + 1}")
