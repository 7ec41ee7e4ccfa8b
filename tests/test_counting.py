"""Tests for sparse_hetconv.counting: hand-worked layers, FlopCounterMode, the paper's column."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sparse_hetconv import (MaskedHetConv2d, SparseHetConv2d, autotune, count_macs, count_model, count_params,
                            to_sparse)
from published import Efficient_HetConv2d, PublishedHetConv, PublishedVGG
from sparse_hetconv.counting import PAPER_VGG16_CIFAR10_MMACS
from sparse_hetconv.models import create_model, vgg16_cifar

# HetConv paper, Table 1: VGG-16 on CIFAR-10, FLOPs (MACs) in millions for P = 1 ... 64.


def flop_counter_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs as torch.utils.flop_counter.FlopCounterMode sees them (it reports 2 FLOPs per MAC).

    Autograd stays on: inference-only fused kernels (oneDNN's post-op sum) are not aten ops the
    counter can see, although they do the same multiply-accumulates.
    """
    with FlopCounterMode(display=False) as counter:
        model(x)
    total = counter.get_total_flops()
    assert total % 2 == 0, f"FlopCounterMode reported an odd FLOP count {total}"
    return total // 2


# -- tiny hand-worked layers -----------------------------------------------------------------------
def test_hetconv_layer_by_hand():
    # M=8, N=4, P=4: m=2, each filter 2 k x k kernels (9 taps) and 6 1x1 kernels; 5x5 output.
    masked = MaskedHetConv2d(8, 4, part=4)
    counts = count_model(masked, (1, 8, 5, 5))
    assert counts.useful_macs == 25 * 4 * (2 * 9 + 6) == 2400, counts.table()
    assert counts.executed_macs == 25 * 4 * (2 * 9 + 8) == 2600, "the masked form runs all 8 1x1 weights"
    assert counts.params == 4 * (2 * 9 + 6) == 96 and counts.stored_params == 72 + 32 == 104, counts.table()
    # stride 2 on a 5x5 input: a 3x3 output, batch 3
    strided = SparseHetConv2d(8, 4, part=4, stride=2, backend="blocked")
    assert count_macs(strided, (3, 8, 5, 5)) == 3 * 9 * 4 * 24 == 2592
    assert count_macs(strided, (3, 8, 5, 5), executed=True) == 2592, "blocked computes only existing kernels"
    strided.backend = "dense"
    assert count_macs(strided, (3, 8, 5, 5), executed=True) == 3 * 9 * 4 * 26, "dense runs a full N x M product"


def test_standard_layers_by_hand():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),          # 6x6x4 outputs, 27 MACs each
        nn.BatchNorm2d(4),                      # one MAC per output
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1, groups=2),  # 6x6x8 outputs, 2*9 MACs each
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),                        # 5 outputs, 8 MACs each
    )
    expected = 144 * 27 + 288 * 18 + 5 * 8
    assert count_macs(model, (1, 3, 6, 6), norm=False) == expected
    assert count_macs(model, (1, 3, 6, 6)) == expected + 144, "BatchNorm counts one MAC per output"
    assert count_macs(model, (2, 3, 6, 6), norm=False) == 2 * expected, "counts are for the whole batch"
    assert count_params(model) == count_params(model, stored=True) == sum(p.numel() for p in model.parameters())


def test_rows_and_table():
    model = nn.Sequential(MaskedHetConv2d(8, 8, part=2), nn.BatchNorm2d(8), nn.ReLU())
    counts = count_model(model, (1, 8, 4, 4))
    assert [(r.name, r.kind) for r in counts.layers] == [("0", "MaskedHetConv2d"), ("1", "BatchNorm2d")], \
        "the masked layer is one row; its gwc / pwc children are not counted again"
    assert counts.layers[0].output_shape == (1, 8, 4, 4)
    table = counts.table()
    assert f"{counts.useful_macs:,}" in table and f"{counts.executed_macs:,}" in table, table
    assert str(counts) == table


def test_shared_module_counts_each_call_and_params_once():
    conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
    model = nn.Sequential(conv, conv)
    assert count_macs(model, (1, 2, 3, 3)) == 2 * 9 * 2 * 18
    assert count_params(model) == 36


# -- agreement with FlopCounterMode ----------------------------------------------------------------
@pytest.mark.parametrize("name, size", [("vgg16_cifar", 32), ("resnet18", 64), ("resnet50", 64)])
def test_standard_models_agree_with_flop_counter(name, size):
    model = create_model(name, part=1).eval()  # part 1: standard convolutions only
    x = torch.randn(2, 3, size, size)
    assert count_macs(model, x.shape, norm=False) == flop_counter_macs(model, x)


@pytest.mark.parametrize("form, backend", [("masked", None), ("sparse", "dense"), ("sparse", "blocked")])
def test_executed_macs_agree_with_flop_counter(form, backend):
    layer = MaskedHetConv2d(16, 8, part=4, stride=2)
    if form == "sparse":
        layer = SparseHetConv2d.from_masked(layer, backend=backend)
    x = torch.randn(2, 16, 7, 7)
    assert count_macs(layer, x.shape, executed=True) == flop_counter_macs(layer, x), \
        f"{form}/{backend}: executed MACs must be what the stock kernels run"


def test_auto_backend_counts_what_it_resolves_to():
    layer = SparseHetConv2d(64, 64, part=4, backend="auto")
    x = torch.zeros(1, 64, 8, 8)
    chosen = autotune.choose(layer.pattern, x, False)
    pinned = SparseHetConv2d(64, 64, part=4, backend=chosen)
    assert count_macs(layer, x.shape, executed=True) == count_macs(pinned, x.shape, executed=True)
    assert count_model(layer, x.shape).layers[0].backend == chosen, "the row names the backend that ran"


# -- the paper's convention -------------------------------------------------------------------------
@pytest.mark.parametrize("part", sorted(PAPER_VGG16_CIFAR10_MMACS))
def test_paper_vgg16_column(part):
    masked = vgg16_cifar(part=part, form="masked")
    counts = count_model(masked, (1, 3, 32, 32))
    paper = PAPER_VGG16_CIFAR10_MMACS[part] * 1e6
    error = abs(counts.useful_macs - paper) / paper
    assert error < 0.005, f"P={part}: {counts.useful_macs / 1e6:.2f} M MACs vs the paper's {paper / 1e6:.2f} M"
    plain = count_macs(masked, (1, 3, 32, 32), norm=False)
    assert abs(plain - paper) / paper < 0.005, f"P={part}: conv + linear only: {plain / 1e6:.2f} M"
    if part > 1:
        assert counts.executed_macs > counts.useful_macs, "the masked form executes its zeroed weights"
    sparse = to_sparse(masked) if part > 1 else masked  # part 1 has no HetConv layer to convert
    assert count_macs(sparse, (1, 3, 32, 32)) == counts.useful_macs, "one model counts the same in both forms"
    assert count_params(sparse) == count_params(masked) == count_params(sparse, stored=True)


def test_paper_baseline_exact():
    assert round(count_macs(vgg16_cifar(part=1), (1, 3, 32, 32)) / 1e6, 2) == PAPER_VGG16_CIFAR10_MMACS[1]


def test_hetconv_layers_count_their_pattern():
    model = vgg16_cifar(part=8, form="sparse")
    modules = dict(model.named_modules())
    for row in count_model(model, (1, 3, 32, 32)).layers:
        layer = modules[row.name]
        if isinstance(layer, SparseHetConv2d):
            pixels = row.output_shape[2] * row.output_shape[3]
            assert row.useful_macs == pixels * layer.pattern.useful_macs_per_pixel(), row
            assert row.params == layer.pattern.num_params(), row


# -- the model is left as it was ---------------------------------------------------------------------
def test_counting_leaves_the_model_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2),
                          nn.BatchNorm1d(2))
    model.train()
    model[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, (1, 3, 6, 6))  # batch 1 would fail BatchNorm1d in train mode: counting runs in eval
    assert [m.training for m in model] == [True, False, True, True, True], "train/eval flags restored"
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"
    assert not any(m._forward_hooks for m in model.modules()), "hooks removed"


def test_uncounted_module_warns():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.warns(UserWarning, match=r"no MAC handler for '1' \(LayerNorm\)"):
        counts = count_model(model, (2, 4))
    assert counts.useful_macs == 2 * 4 * 4 and counts.params == 20 + 8


@pytest.mark.parametrize("size", [(3,), "1x3x32x32", (1, 3, 0, 32), (1, 3.0, 32, 32), 32])
def test_bad_input_size(size):
    with pytest.raises((ValueError, TypeError), match="input_size"):
        count_macs(nn.Conv2d(3, 3, 1), size)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        count_macs("vgg", (1, 3, 32, 32))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        count_params(None)
    with pytest.raises(TypeError, match="executed must be a bool"):
        count_macs(nn.Conv2d(3, 3, 1), (1, 3, 4, 4), executed="yes")
    with pytest.raises(TypeError, match="stored must be a bool"):
        count_params(nn.Conv2d(3, 3, 1), stored=1)


# -- counting by computation: the published gwc + pwc layout -------------------------------------------
def test_published_layer_by_hand():
    # M=8, N=4, P=4 on a 5x5 input: each filter 2 k x k kernels (9 taps) and 6 1x1 kernels, and the
    # published pwc runs all 8 1x1 weights; both biases become one in the exact conversion.
    layer = PublishedHetConv(8, 4, 4, bias=True)
    counts = count_model(layer, (1, 8, 5, 5))
    assert [row.kind for row in counts.layers] == ["PublishedHetConv"], \
        f"one row for the layer, its gwc / pwc children not counted again: {counts.table()}"
    assert counts.useful_macs == 25 * 4 * (2 * 9 + 6), f"useful MACs by the pattern: {counts.table()}"
    assert counts.executed_macs == 25 * 4 * (2 * 9 + 8), f"executed: gwc and the full pwc: {counts.table()}"
    assert counts.params == 4 * (2 * 9 + 6) + 4, f"the pattern's kernels and one bias: {counts.table()}"
    assert counts.stored_params == 4 * 2 * 9 + 4 * 8 + 2 * 4, counts.table()
    assert count_params(layer) == counts.params and count_params(layer, stored=True) == counts.stored_params


@pytest.mark.parametrize("part", [2, 4, 16])
def test_published_vgg16_counts_what_its_exact_conversion_counts(part):
    """Before the fix the published layout counted its zeroed 1 x 1 weights as useful (P = 4:
    114.77 M MACs and 5,590,538 parameters, where the conversion has 106.12 M and 5,181,962)."""
    torch.manual_seed(0)
    published = PublishedVGG(part).eval()  # eval: FlopCounterMode runs it on a batch of 1
    converted = to_sparse(published, backend="blocked")
    size = (1, 3, 32, 32)
    assert count_macs(published, size) == count_macs(converted, size), "useful MACs: published vs to_sparse"
    assert count_params(published) == count_params(converted), "parameters: published vs to_sparse"
    assert count_macs(published, size) == count_macs(vgg16_cifar(part=part, form="masked"), size), \
        "useful MACs: published vs the library's masked VGG-16"
    x = torch.randn(size)
    assert count_macs(published, size, executed=True, norm=False) == flop_counter_macs(published, x), \
        "executed MACs must be what the published layers really run (FlopCounterMode: no BatchNorm)"
    assert count_params(published, stored=True) == sum(p.numel() for p in published.parameters())


def test_published_layer_with_a_grouped_pwc():
    """A grouped 1 x 1 convolution lives on the block diagonal: it folds into the centre taps
    (docs/design.md §4); the layer is a HetConv with zero 1 x 1 kernels, and executes its grouped pwc."""
    layer = PublishedHetConv(8, 4, 4, pwc_groups=4)
    x = torch.randn(2, 8, 5, 5)
    counts = count_model(layer, x.shape)
    assert counts.useful_macs == count_macs(to_sparse(layer), x.shape), "useful MACs: the conversion's"
    assert counts.executed_macs == flop_counter_macs(layer, x), "executed MACs: what the two convolutions run"


def test_sxpro_sum_layer_counts_its_pattern_and_executes_its_three_convolutions():
    """sxpro's conv3x3(x) + conv1x1(x) - conv1x1_(x) has no pwc: count_model raised AttributeError
    ('Efficient_HetConv2d' object has no attribute 'pwc') before the fix."""
    torch.manual_seed(0)
    layer = Efficient_HetConv2d(8, 8, 4).eval()
    x = torch.randn(1, 8, 6, 6)
    counts = count_model(nn.Sequential(layer), x.shape)
    assert [row.kind for row in counts.layers] == ["Efficient_HetConv2d"], counts.table()
    assert counts.useful_macs == 36 * 8 * (2 * 9 + 6) == count_macs(to_sparse(layer), x.shape), counts.table()
    # executed: grouped 3x3 (2 channels x 9 taps) + full 1x1 (8) + grouped 1x1 (2), per filter and pixel
    assert counts.executed_macs == 36 * 8 * (2 * 9 + 8 + 2) == flop_counter_macs(layer, x), counts.table()
    assert counts.params == 8 * (2 * 9 + 6) + 8 == count_params(to_sparse(layer)), "the pattern, one bias"
    assert counts.stored_params == sum(p.numel() for p in layer.parameters())


def test_sum_layer_is_probed_once(monkeypatch):
    import sparse_hetconv.counting as counting
    calls = []
    real = counting.read_hetconv_weights

    def counted(module, path=""):
        calls.append(path)
        return real(module, path)
    monkeypatch.setattr(counting, "read_hetconv_weights", counted)
    count_model(nn.Sequential(Efficient_HetConv2d(8, 8, 4)), (1, 8, 6, 6))
    assert calls == ["0"], f"one probe of the sum module, got {calls}"


def test_module_with_gwc_and_pwc_that_is_no_hetconv_counts_its_convolutions():
    class Product(nn.Module):  # gwc and pwc children, but not gwc(x) + pwc(x)
        def __init__(self):
            super().__init__()
            self.gwc = nn.Conv2d(8, 4, 3, padding=1, groups=4, bias=False)
            self.pwc = nn.Conv2d(8, 4, 1, bias=False)

        def forward(self, x):
            return self.gwc(x) * self.pwc(x)

    model = Product()
    counts = count_model(model, (1, 8, 5, 5))
    assert sorted(row.name for row in counts.layers) == ["gwc", "pwc"], counts.table()
    assert counts.useful_macs == counts.executed_macs == 25 * 4 * (2 * 9 + 8), counts.table()
    assert count_params(model) == count_params(model, stored=True) == 4 * 2 * 9 + 4 * 8


@pytest.mark.parametrize("model, size, where", [
    (lambda: PublishedVGG(4), (1, 3, 16, 16), r"module 'features\.43' \(MaxPool2d\)"),
    (lambda: PublishedVGG(4), (1, 4, 32, 32), r"module 'features\.0' \(Conv2d\)"),
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), SparseHetConv2d(16, 8, 4)), (1, 3, 8, 8),
     r"module '1' \(SparseHetConv2d\) failed: SparseHetConv2d expects input with 16 channels"),
    (lambda: SparseHetConv2d(8, 8, 4), (2, 8, 5), r"module '<model>' \(SparseHetConv2d\)"),
], ids=["too-small", "channels", "inner-layer", "rank"])
def test_an_input_the_model_cannot_take(model, size, where):
    model = model()
    model.train()
    with pytest.raises(ValueError, match=rf"cannot take an input of size {re.escape(str(size))}: {where}"):
        count_macs(model, size)
    assert all(m.training for m in model.modules()), "train/eval flags restored after the failure"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "hooks removed after the failure"


@pytest.mark.parametrize("size, error, match", [
    (torch.zeros(1, 3, 8, 8), TypeError, r"got a torch\.Tensor of shape \(1, 3, 8, 8\); pass its \.shape"),
    ((1, 3, -4, 8), ValueError, r"input_size \(\(1, 3, -4, 8\)\) must hold ints >= 1: element 2 is -4"),
    ((1, True, 8, 8), TypeError, r"input_size \(\(1, True, 8, 8\)\) must hold ints: element 1 is True \(bool\)"),
    ((1, 3, 8.0, 8), TypeError, r"element 2 is 8\.0 \(float\)"),
])
def test_input_size_errors_name_the_value(size, error, match):
    with pytest.raises(error, match=match):
        count_macs(nn.Conv2d(3, 3, 1), size)


def test_norm_must_be_a_bool():
    with pytest.raises(TypeError, match="norm must be a bool, got str"):
        count_macs(nn.Conv2d(3, 3, 1), (1, 3, 4, 4), norm="no")
    with pytest.raises(TypeError, match="norm must be a bool, got int"):
        count_model(nn.Conv2d(3, 3, 1), (1, 3, 4, 4), norm=0)
