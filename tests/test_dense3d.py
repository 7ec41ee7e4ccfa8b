"""The dense 3-D HetConv layers against the definition oracle: the reference of the spconv tests.

``test_submanifold.py`` takes :class:`SparseHetConv3d` as the truth at the active sites; here that layer
and its masked twin are checked against the oracle on the same shapes and kernels, on grids that
are zero outside a few active sites (how the spconv tests use them).
"""

import pytest
import torch

from helpers import assert_close, masked_reference_weights, oracle, oracle_of
from sparse_hetconv import MaskedHetConv3d, SparseHetConv3d, to_masked, to_sparse


def sparse_grid(channels, size, seed):
    g = torch.Generator().manual_seed(seed)
    active = torch.rand((2, 1) + (size,) * 3, generator=g) < 0.3
    return (torch.randn((2, channels) + (size,) * 3, dtype=torch.float64, generator=g) * active).requires_grad_(True)


@pytest.mark.parametrize("M,N,P", [(4, 6, 1), (8, 4, 2), (8, 12, 4), (6, 9, 3), (8, 8, 8)])
@pytest.mark.parametrize("kernel,stride", [(3, 1), ((3, 1, 5), 1), (3, 2)])
def test_dense_3d_layers_match_oracle(M, N, P, kernel, stride):
    what = f"M={M} N={N} P={P} kernel={kernel} stride={stride}"
    x = sparse_grid(M, 5, seed=M * N + P)
    sparse = SparseHetConv3d(M, N, P, kernel, stride, bias=True, backend="dense", dtype=torch.float64)
    masked = to_masked(sparse)
    assert isinstance(masked, MaskedHetConv3d), f"{what}: to_masked gave {type(masked).__name__}"
    expected = oracle_of(sparse, x)
    probe = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (expected_grad,) = torch.autograd.grad((expected * probe).sum(), x)
    for layer, params in ((sparse, None), (masked, masked_reference_weights(masked))):
        got = layer(x)
        assert_close(got, expected if params is None else oracle(x, *params, stride, P), f"{what} {layer!r}")
        (grad,) = torch.autograd.grad((got * probe).sum(), x)
        assert_close(grad, expected_grad, f"{what} {type(layer).__name__} input gradient")
    assert_close(to_sparse(masked)(x), expected, f"{what} masked -> sparse round trip")
