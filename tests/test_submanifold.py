"""Submanifold HetConv on spconv tensors against the dense HetConv, forward and backward, in float64.

Submanifold semantics: the reference is the dense layer (:class:`SparseHetConv3d` / ``2d``, itself
checked against the definition oracle in ``test_dense3d.py``) evaluated on the dense grid with zeros
at the inactive sites, compared at the active sites only.
"""

import subprocess
import sys

import pytest
import torch
from torch import nn

from helpers import assert_close

spconv_pt = pytest.importorskip("spconv.pytorch", reason="the spconv extra is not installed")
from spconv.core import ConvAlgo  # noqa: E402

from sparse_hetconv import MaskedHetConv3d, SparseHetConv2d, SparseHetConv3d, to_masked  # noqa: E402
from sparse_hetconv.pattern import HetConvPattern  # noqa: E402
from sparse_hetconv.submanifold import (  # noqa: E402
    SubMHetConv2d,
    SubMHetConv3d,
    default_chunks,
    from_submanifold,
    to_submanifold,
)

SUBM = {2: SubMHetConv2d, 3: SubMHetConv3d}
DENSE = {2: SparseHetConv2d, 3: SparseHetConv3d}
SHAPES = [(4, 6, 1), (8, 4, 2), (8, 12, 4), (6, 9, 3), (8, 8, 8)]  # (M, N, P)


def random_sites(dims, size, batch, occupancy, seed):
    """int32 indices (batch, *coords) of random active sites, in torch.nonzero's (column-major) layout."""
    g = torch.Generator().manual_seed(seed)
    return torch.nonzero(torch.rand((batch,) + (size,) * dims, generator=g) < occupancy).int()


def sparse_input(indices, channels, dims, size, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(indices.shape[0], channels, dtype=torch.float64, generator=g).requires_grad_(True)
    return spconv_pt.SparseConvTensor(features, indices, [size] * dims, batch)


def dense_grid(x, batch):
    """The dense (batch, C, *spatial) grid of a SparseConvTensor, zeros at inactive sites (differentiable)."""
    grid = x.features.new_zeros((batch, *x.spatial_shape, x.features.shape[1]))
    grid = grid.index_put(tuple(x.indices.long().t()), x.features)
    return grid.movedim(-1, 1)


def at_sites(dense_out, indices):
    """(sites, C) rows of a dense (batch, C, *spatial) output at the given sites."""
    return dense_out.movedim(1, -1)[tuple(indices.long().t())]


def check_against_dense(layer, x, batch, what):
    """Forward and gradients (features, every parameter) of a SubM layer against its dense twin."""
    dense = layer.to_dense()
    x_dense = x.replace_feature(x.features.detach().clone().requires_grad_(True))
    got = layer(x)
    expected = at_sites(dense(dense_grid(x_dense, batch)), x.indices)
    assert torch.equal(got.indices, x.indices.contiguous()), f"{what}: the active sites changed"
    assert got.spatial_shape == x.spatial_shape, f"{what}: spatial shape {got.spatial_shape} != {x.spatial_shape}"
    assert_close(got.features, expected, f"{what} forward")
    probe = torch.randn(got.features.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    names = [name for name, _ in layer.named_parameters()]
    got_grads = torch.autograd.grad((got.features * probe).sum(), [x.features, *layer.parameters()])
    exp_grads = torch.autograd.grad((expected * probe).sum(), [x_dense.features, *dense.parameters()])
    for g, e, name in zip(got_grads, exp_grads, ["features", *names]):
        assert_close(g, e, f"{what} gradient of {name}")


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("M,N,P", SHAPES)
def test_matches_dense_at_active_sites(dims, M, N, P):
    for occupancy, seed in ((0.08, 0), (0.35, 1)):
        indices = random_sites(dims, 6, 2, occupancy, seed)
        for chunks in [q for q in range(1, P + 1) if P % q == 0]:
            layer = SUBM[dims](M, N, P, bias=(chunks == 1), chunks=chunks, dtype=torch.float64)
            x = sparse_input(indices, M, dims, 6, 2, seed)
            check_against_dense(layer, x, 2, f"{dims}-D M={M} N={N} P={P} chunks={chunks} occupancy={occupancy}")


@pytest.mark.parametrize("dims", [2, 3])
def test_empty_and_single_site(dims):
    layer = SUBM[dims](8, 12, 4, bias=True, chunks=2, dtype=torch.float64)
    empty = sparse_input(torch.zeros((0, dims + 1), dtype=torch.int32), 8, dims, 5, 1)
    out = layer(empty)
    assert out.features.shape == (0, 12), f"empty input gave features of shape {tuple(out.features.shape)}"
    out.features.sum().backward()
    assert layer.weight_kxk.grad is not None and not layer.weight_kxk.grad.any(), "empty input: non-zero weight grad"
    layer.zero_grad()
    single = sparse_input(torch.tensor([[0] + [2] * dims], dtype=torch.int32), 8, dims, 5, 1)
    check_against_dense(layer, single, 1, f"{dims}-D single site")
    # A lone site sees only its centre: the output is the centre taps plus the 1 x 1 part.
    centre = layer.weight_kxk[(slice(None), slice(None)) + (1,) * dims]
    w = layer.dense_1x1() + torch.block_diag(*centre.detach().view(4, 3, 2).unbind(0))
    assert_close(layer(single).features, single.features @ w.t() + layer.bias, f"{dims}-D single site by hand")


def test_anisotropic_kernel_and_k5():
    for kernel in [(3, 1, 5), 5]:
        layer = SubMHetConv3d(4, 8, 2, kernel_size=kernel, chunks=2, dtype=torch.float64)
        x = sparse_input(random_sites(3, 6, 1, 0.3, 3), 4, 3, 6, 1)
        check_against_dense(layer, x, 1, f"kernel_size={kernel}")


def test_gradcheck():
    layer = SubMHetConv3d(4, 6, 2, bias=True, chunks=2, dtype=torch.float64)
    indices = random_sites(3, 3, 1, 0.5, 4)

    def run(features, weight_kxk, weight_1x1):
        x = spconv_pt.SparseConvTensor(features, indices, [3, 3, 3], 1)
        return torch.func.functional_call(layer, {"weight_kxk": weight_kxk, "weight_1x1": weight_1x1}, (x,)).features

    features = torch.randn(indices.shape[0], 4, dtype=torch.float64, requires_grad=True)
    weights = [w.detach().clone().requires_grad_() for w in (layer.weight_kxk, layer.weight_1x1)]
    assert torch.autograd.gradcheck(run, (features, *weights)), "gradcheck failed"


def test_default_chunks_and_private_key():
    assert default_chunks(HetConvPattern(64, 64, 8, 3, 3)) == 4, "64 channels, P=8: widest chunks of 16"
    assert default_chunks(HetConvPattern(128, 256, 8, 3, 3)) == 8
    assert default_chunks(HetConvPattern(16, 16, 4, 3, 3)) == 1
    layer = SubMHetConv3d(32, 32, 4).double()
    x = sparse_input(random_sites(3, 5, 1, 0.3, 5), 32, 3, 5, 1)
    out = layer(x)
    assert out.indice_dict == {}, f"the chunks' private index key leaked: {list(out.indice_dict)}"
    check_against_dense(layer, x, 1, "default chunks (2)")


def test_indice_key_is_shared_with_spconv_layers():
    x = sparse_input(random_sites(3, 6, 1, 0.3, 6), 8, 3, 6, 1)
    first = SubMHetConv3d(8, 8, 4, indice_key="subm1", chunks=4).double()
    second = SubMHetConv3d(8, 8, 2, indice_key="subm1").double()
    theirs = spconv_pt.SubMConv3d(8, 8, 3, bias=False, indice_key="subm1", algo=ConvAlgo.Native).double()
    h = first(x)
    assert "subm1" in h.indice_dict, "the layer did not store its index pairs under its indice_key"
    stored = h.indice_dict["subm1"]
    out = theirs(second(h))
    assert out.indice_dict["subm1"] is stored, "the shared index pairs were recomputed"
    unshared = [SubMHetConv3d.from_dense(first.to_dense()), SubMHetConv3d.from_dense(second.to_dense())]
    expected = theirs(unshared[1](unshared[0](x)))
    assert_close(out.features, expected.features, "layers sharing an indice_key")


def test_chunks_share_one_set_of_index_pairs(monkeypatch):
    calls = []
    original = spconv_pt.ops.get_indice_pairs
    monkeypatch.setattr(spconv_pt.ops, "get_indice_pairs", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = sparse_input(random_sites(3, 5, 1, 0.3, 9), 8, 3, 5, 1)
    SubMHetConv3d(8, 8, 4, chunks=4).double()(x)
    assert len(calls) == 1, f"4 chunks computed the index pairs {len(calls)} times, expected once"


def test_bad_input():
    layer = SubMHetConv3d(8, 8, 2)
    with pytest.raises(TypeError, match=r"SubMHetConv3d expects a spconv.pytorch.SparseConvTensor, got Tensor; "
                                        r"for a dense tensor use SparseHetConv3d"):
        layer(torch.randn(1, 8, 4, 4, 4))
    x = sparse_input(random_sites(3, 4, 1, 0.3, 7), 6, 3, 4, 1)
    with pytest.raises(ValueError, match=r"expects features of shape \(sites, 8\) \(8 channels\), got \(\d+, 6\)"):
        layer.double()(x)
    x2 = sparse_input(random_sites(2, 4, 1, 0.3, 7), 8, 2, 4, 1)
    with pytest.raises(ValueError, match=r"expects 3-D sites \(indices of shape \(sites, 4\)"):
        layer(x2)
    with pytest.raises(TypeError, match=r"has torch.float32 weights but the input features are torch.float64"):
        SubMHetConv2d(8, 8, 2)(x2)
    with pytest.raises(ValueError, match=r"runs only on CUDA"):
        SubMHetConv2d(8, 8, 2, algo=ConvAlgo.MaskImplicitGemm).double()(x2)
    with pytest.raises(ValueError, match=r"indice_key 'k' holds index pairs for kernel_size \(5, 5\), not \(3, 3\)"):
        SubMHetConv2d(8, 8, 2, indice_key="k").double()(SubMHetConv2d(8, 8, 2, 5, indice_key="k").double()(x2))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"in_channels \(10\) must be divisible by part \(4\)"):
        SubMHetConv3d(10, 8, 4)
    with pytest.raises(ValueError, match=r"chunks \(3\) must divide part \(4\)"):
        SubMHetConv3d(8, 8, 4, chunks=3)
    with pytest.raises(TypeError, match=r"indice_key must be a str or None, got int"):
        SubMHetConv3d(8, 8, 4, indice_key=1)
    with pytest.raises(TypeError, match=r"algo must be a spconv.core.ConvAlgo or None, got str"):
        SubMHetConv3d(8, 8, 4, algo="native")
    with pytest.raises(ValueError, match=r"stride \(\(2, 2, 2\)\) of SparseHetConv3d must be 1"):
        SubMHetConv3d.from_dense(SparseHetConv3d(8, 8, 4, stride=2))
    with pytest.raises(ValueError, match=r"SubMHetConv2d.from_dense expects a 2-D HetConv, got a 3-D one"):
        SubMHetConv2d.from_dense(SparseHetConv3d(8, 8, 4))
    with pytest.raises(TypeError, match=r"SubMHetConv3d.from_dense expects a HetConv layer"):
        SubMHetConv3d.from_dense(nn.Conv3d(8, 8, 3))


def test_conversions_round_trip():
    dense = SparseHetConv3d(8, 12, 4, kernel_size=(3, 1, 3), bias=True, dtype=torch.float64).eval()
    subm = SubMHetConv3d.from_dense(dense, indice_key="a", chunks=2)
    assert not subm.training and subm.weight_kxk.dtype == torch.float64, "device/dtype/eval state not carried"
    assert repr(subm) == "SubMHetConv3d(8, 12, part=4, kernel_size=(3, 1, 3), bias=True, indice_key='a', chunks=2)"
    back = subm.to_dense()
    for (name, a), (_, b) in zip(dense.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), f"round trip changed {name}"
    csr = subm.sparse_weight()
    assert torch.equal(csr.to_dense(), dense.dense_1x1()), "sparse_weight differs from the dense layer's 1x1 part"
    loaded = SubMHetConv3d(8, 12, 4, (3, 1, 3), bias=True).double()
    loaded.load_state_dict(dense.state_dict())  # same keys and shapes as the dense layer
    masked = to_masked(dense)
    assert isinstance(masked, MaskedHetConv3d)
    from_masked = SubMHetConv3d.from_dense(masked)
    x = sparse_input(random_sites(3, 5, 1, 0.3, 8), 8, 3, 5, 1)
    for layer in (subm, loaded, from_masked):
        check_against_dense(layer, x, 1, f"converted {layer!r}")


def test_model_conversion():
    model = nn.Sequential(SparseHetConv3d(8, 8, 4), nn.ReLU(), SparseHetConv2d(8, 4, 2, bias=True),
                          MaskedHetConv3d(4, 8, 2))
    subm = to_submanifold(model, indice_key="k")
    assert [type(m).__name__ for m in subm] == ["SubMHetConv3d", "ReLU", "SubMHetConv2d", "SubMHetConv3d"]
    assert isinstance(model[0], SparseHetConv3d), "to_submanifold changed its input without inplace=True"
    back = from_submanifold(subm)
    assert [type(m).__name__ for m in back] == ["SparseHetConv3d", "ReLU", "SparseHetConv2d", "SparseHetConv3d"]
    for name, value in to_masked(model).state_dict().items():
        assert torch.equal(value, to_masked(back).state_dict()[name]), f"model round trip changed {name}"
    with pytest.raises(ValueError, match=r"module '1': stride \(\(2, 2, 2\)\)"):
        to_submanifold(nn.Sequential(nn.ReLU(), SparseHetConv3d(8, 8, 4, stride=2)))


def test_import_without_spconv():
    code = (
        "import sys; sys.modules['spconv'] = None\n"
        "import sparse_hetconv\n"
        "try:\n    import sparse_hetconv.submanifold\nexcept ImportError as e:\n    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"import sparse_hetconv failed without spconv: {result.stderr[-2000:]}"
    assert "pip install sparse_hetconv[spconv]" in result.stdout, f"unclear ImportError: {result.stdout!r}"
