import pytest
import torch

from helpers import kxk_channels, one_by_one_channels
from sparse_hetconv import HetConvPattern, shifted_to_block_permutation


def test_mask_hand_worked():
    mask = HetConvPattern(8, 4, part=4).mask_1x1().int()
    expected = torch.tensor([
        [0, 0, 1, 1, 1, 1, 1, 1],
        [1, 1, 0, 0, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 1, 1],
        [1, 1, 1, 1, 1, 1, 0, 0],
    ], dtype=torch.int32)
    assert torch.equal(mask, expected), f"mask of (8, 4, P=4) is\n{mask}"


def test_mask_with_several_filters_per_group():
    mask = HetConvPattern(4, 6, part=2).mask_1x1().int()
    expected = torch.tensor([[0, 0, 1, 1]] * 3 + [[1, 1, 0, 0]] * 3, dtype=torch.int32)
    assert torch.equal(mask, expected), f"mask of (4, 6, P=2) is\n{mask}"


@pytest.mark.parametrize("shape", [(8, 4, 4), (6, 9, 3), (12, 12, 1), (5, 10, 5), (16, 32, 8)])
def test_columns_and_csr_match_definition(shape):
    m_in, n_out, part = shape
    p = HetConvPattern(m_in, n_out, part)
    cols = p.columns()
    for j in range(n_out):
        assert cols[j].tolist() == one_by_one_channels(j, m_in, n_out, part), f"row {j} of columns()"
        assert list(p.kxk_channels(j)) == kxk_channels(j, m_in, n_out, part), f"kxk_channels({j})"
    crow = p.crow_indices()
    assert crow.tolist() == [j * p.num_1x1 for j in range(n_out + 1)], "crow_indices"
    assert torch.equal(p.col_indices(), cols.reshape(-1)), "col_indices"
    assert int(p.mask_1x1().sum()) == n_out * p.num_1x1, "mask count"


def test_counts_hand_worked():
    p = HetConvPattern(256, 256, part=4)
    assert (p.block_in, p.block_out, p.num_1x1) == (64, 64, 192)
    assert p.useful_macs_per_pixel() == 256 * (9 * 64 + 192) == 196608
    assert p.num_params() == 196608 and p.num_params(bias=True) == 196608 + 256
    assert p.masked_macs_per_pixel() == 256 * (9 * 64 + 256)
    standard = HetConvPattern(256, 256, part=1)
    assert standard.useful_macs_per_pixel() == 256 * 256 * 9, "P=1 is a standard convolution"
    five = HetConvPattern(8, 8, part=8, kernel_size=5)
    assert five.useful_macs_per_pixel() == 8 * (25 * 1 + 7)


def test_3d_counts():
    p = HetConvPattern(8, 4, part=2, kernel_size=3, dims=3)
    assert p.kernel_size == (3, 3, 3) and p.useful_macs_per_pixel() == 4 * (27 * 4 + 4)


def test_scatter_gather_round_trip():
    p = HetConvPattern(6, 9, part=3)
    values = torch.randn(9, p.num_1x1)
    dense = p.scatter_1x1(values)
    assert torch.equal(dense[~p.mask_1x1()], torch.zeros(int((~p.mask_1x1()).sum()))), "diagonal not zero"
    assert torch.equal(p.gather_1x1(dense), values), "gather(scatter(v)) != v"
    for j in range(9):
        assert torch.equal(dense[j, one_by_one_channels(j, 6, 9, 3)], values[j]), f"row {j} misplaced"


def test_block_diagonal():
    p = HetConvPattern(4, 6, part=2)
    dense = torch.arange(24.0).view(6, 4)
    expected = torch.stack([dense[j, kxk_channels(j, 4, 6, 2)] for j in range(6)])
    assert torch.equal(p.block_diagonal(dense), expected)


def test_fold_moves_diagonal_to_centre_and_leaves_inputs_alone():
    p = HetConvPattern(4, 2, part=2)
    kxk = torch.zeros(2, 2, 3, 3)
    dense = torch.arange(1.0, 9.0).view(2, 4)
    before = dense.clone()
    new_kxk, new_dense = p.fold(kxk, dense)
    assert torch.equal(dense, before) and torch.equal(kxk, torch.zeros(2, 2, 3, 3)), "fold changed its inputs"
    assert new_kxk[0, :, 1, 1].tolist() == [1.0, 2.0] and new_kxk[1, :, 1, 1].tolist() == [7.0, 8.0]
    assert new_dense.tolist() == [[0, 0, 3, 4], [5, 6, 0, 0]]
    assert float(new_kxk.sum()) == 1 + 2 + 7 + 8, "only centre taps may change"


def test_shifted_pattern_permutes_into_block_pattern():
    m_in, n_out, part = 12, 6, 3
    shifted = torch.tensor([[(c - j) % part != 0 for c in range(m_in)] for j in range(n_out)])
    perm_in = shifted_to_block_permutation(m_in, part)
    perm_out = shifted_to_block_permutation(n_out, part)
    block = HetConvPattern(m_in, n_out, part).mask_1x1()
    assert torch.equal(shifted[perm_out][:, perm_in], block)
    assert sorted(perm_in.tolist()) == list(range(m_in)), "not a permutation"


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(in_channels=10, out_channels=8, part=4), ValueError, r"in_channels \(10\) must be divisible by part \(4\)"),
    (dict(in_channels=8, out_channels=6, part=4), ValueError, r"out_channels \(6\) must be divisible by part \(4\)"),
    (dict(in_channels=8, out_channels=8, part=0), ValueError, r"part \(0\) must be an int >= 1"),
    (dict(in_channels=8, out_channels=8, part=-2), ValueError, r"part \(-2\) must be an int >= 1"),
    (dict(in_channels=8, out_channels=8, part=2, kernel_size=4), ValueError, r"kernel_size \(4\) must be odd"),
    (dict(in_channels=8, out_channels=8, part=2, kernel_size=(3, 2)), ValueError, r"kernel_size \(\(3, 2\)\) must be odd"),
    (dict(in_channels=8, out_channels=8, part=2.0), TypeError, r"part must be an int, got float"),
    (dict(in_channels=8, out_channels=8, part=True), TypeError, r"part must be an int, got bool"),
    (dict(in_channels=0, out_channels=8, part=1), ValueError, r"in_channels \(0\) must be an int >= 1"),
    (dict(in_channels=8, out_channels=8, part=2, kernel_size=(3, 3, 3)), ValueError, r"sequence of 2 ints"),
])
def test_bad_pattern_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        HetConvPattern(**kwargs)


def test_index_tensors_are_cached_not_rebuilt():
    p = HetConvPattern(16, 16, part=4)
    assert p.columns() is HetConvPattern(16, 16, part=4).columns(), "same shape should share one index tensor"


def test_shifted_permutation_errors():
    with pytest.raises(ValueError, match=r"channels \(10\) must be divisible by part \(4\)"):
        shifted_to_block_permutation(10, 4)
