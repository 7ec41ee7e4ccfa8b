"""backend="auto": the autotuner's choice (cost model and measure mode), its cache and its API.

The backends themselves are tested in tests/backends/. No timing is asserted anywhere.
"""

import pytest
import torch

from sparse_hetconv import SparseHetConv2d, autotune, ops
from sparse_hetconv.models import vgg16_cifar
from sparse_hetconv.pattern import HetConvPattern

CL = torch.channels_last


pytestmark = pytest.mark.usefixtures("fresh_choices")


@pytest.fixture
def stock_only(monkeypatch):
    """The cost model of the stock kernels alone: the operator's CPU kernels reported unbuilt (the
    model proposes ``fused`` for every float32 2-D CPU call where they are; tested below)."""
    monkeypatch.setattr(ops, "cpu_kernel", lambda: None)


def test_choose_is_deterministic_cached_and_explained(stock_only):
    pattern = HetConvPattern(256, 256, 2)
    x = torch.randn(32, 256, 8, 8).contiguous(memory_format=CL)
    with autotune.mode("model"):
        first = autotune.choose(pattern, x, training=False)
        assert first == autotune.choose(pattern, x, training=False)
    key = autotune.signature(pattern, x, False, (1, 1))
    assert autotune.choices()[key] == (first, "model")
    costs = autotune.estimate(pattern, 32 * 64, training=False)
    assert set(costs) == {"dense", "grouped", "blocked", "torch_sparse"} and min(costs.values()) > 0
    assert first == ("grouped" if costs["grouped"] < autotune.MARGIN * costs["dense"] else "dense")


@pytest.mark.parametrize("kwargs,expected", [
    (dict(part=1), "dense"),  # no 1x1 part
    (dict(part=2, dtype=torch.float64), "dense"),  # outside the calibrated dtypes
    (dict(part=2, layout="nchw"), "dense"),  # only channels-last was calibrated for grouped
    (dict(part=2, training=True), "dense"),  # the grouped backward is slower
    (dict(part=2, batch=1, size=2), "dense"),  # overhead-bound: one call beats P - 1
])
def test_model_choice_in_the_cases_it_was_calibrated_against(stock_only, kwargs, expected):
    part = kwargs.get("part", 2)
    pattern = HetConvPattern(512, 512, part)
    size = kwargs.get("size", 4)
    x = torch.randn(kwargs.get("batch", 32), 512, size, size, dtype=kwargs.get("dtype", torch.float32))
    if kwargs.get("layout", "channels_last") == "channels_last":
        x = x.contiguous(memory_format=CL)
    with autotune.mode("model"):
        assert autotune.choose(pattern, x, training=kwargs.get("training", False)) == expected


def test_grouped_chosen_for_wide_groups_at_part_two(stock_only):
    x = torch.randn(32, 512, 4, 4).contiguous(memory_format=CL)
    with autotune.mode("model"):
        assert autotune.choose(HetConvPattern(512, 512, 2), x, training=False) == "grouped"
        assert autotune.choose(HetConvPattern(512, 512, 8), x, training=False) == "dense"


@pytest.mark.parametrize("fastest,how", [("grouped", "confirmed"), ("dense", "refuted")])
def test_confirm_mode_times_only_the_models_non_dense_proposals(stock_only, monkeypatch, fastest, how):
    timed = []

    def fake_timing(call, input, names, strides=(), repeats=3):
        timed.append(names)
        return fastest

    monkeypatch.setattr(autotune, "_measured_choice", fake_timing)
    x = torch.randn(32, 512, 4, 4).contiguous(memory_format=CL)
    pattern = HetConvPattern(512, 512, 2)
    assert autotune.get_mode() == "confirm", "confirm is the default mode"
    assert autotune.choose(pattern, x, training=False, stride=(2, 2)) == fastest
    assert timed == [("dense", "grouped")], "the model's proposal is timed against dense only"
    assert autotune.choices()[autotune.signature(pattern, x, False, (2, 2))] == (fastest, how)
    assert autotune.choose(pattern, x, training=True) == "dense" and len(timed) == 1, \
        "a dense proposal (training) is not timed"
    autotune.choose(pattern, x, training=False, stride=(2, 2))
    assert len(timed) == 1, "the decision is cached per signature"


def test_the_model_proposes_fused_where_it_computes_and_confirm_times_it(monkeypatch):
    """Where the CPU kernels run (2-D, float32, CPU) the model proposes them; confirm times the
    proposal against dense, in inference and in training; elsewhere the stock model decides."""
    if ops.cpu_kernel() is None:
        pytest.skip(ops.kernel_info())
    timed = []
    monkeypatch.setattr(autotune, "_measured_choice",
                        lambda call, input, names, strides=(), repeats=3:
                        timed.append(names) or names[-1])
    pattern = HetConvPattern(64, 64, 4)
    x = torch.randn(4, 64, 8, 8)
    assert autotune.choose(pattern, x, training=False) == "fused"
    assert autotune.choose(pattern, x, training=True) == "fused"
    assert timed == [("dense", "fused")] * 2, timed
    for other in (x.double(), x.bfloat16()):
        assert autotune.choose(pattern, other, training=False) != "fused"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autotune.choose(pattern, x, training=False) != "fused", "autocast computes in bfloat16"
    assert autotune.choose(HetConvPattern(16, 16, 4, dims=3), torch.randn(1, 16, 3, 3, 3), False) != "fused"
    timed.clear()
    autotune.choose(pattern, torch.randn(1, 64, 4, 4), training=False)
    assert timed == [("dense", "fused", "blocked")], f"a few output pixels also time blocked: {timed}"
    autotune.choose(pattern, torch.randn(1, 64, 4, 4), training=True)
    assert timed[-1] == ("dense", "fused"), "training calls time fused against dense only"


def test_candidates_are_the_backends_available_on_the_device():
    cpu = autotune.candidates("cpu")
    assert {"dense", "grouped", "blocked", "torch_sparse"} <= set(cpu) and "triton" not in cpu


def test_measure_mode_times_once_per_signature():
    pattern = HetConvPattern(16, 16, 2)
    x = torch.randn(2, 16, 5, 5)
    with autotune.mode("measure"):
        got = autotune.choose(pattern, x, training=True)
        assert autotune.get_mode() == "measure"
    assert autotune.get_mode() == "confirm", "the context manager must restore the mode"
    assert got in autotune.candidates("cpu")
    assert autotune.choices()[autotune.signature(pattern, x, True, (1, 1))] == (got, "measure")


def test_set_mode_rejects_unknown_modes():
    with pytest.raises(ValueError, match=r"mode \('fast'\) must be one of"):
        autotune.set_mode("fast")


def test_layer_reports_what_auto_resolved_to_and_can_be_pinned(stock_only):
    layer = SparseHetConv2d(512, 512, 2).to(memory_format=CL).eval()
    assert layer.resolved_backend is None, "nothing resolved before the first call"
    x = torch.randn(32, 512, 4, 4).contiguous(memory_format=CL)
    autotune.set_mode("model")
    with torch.no_grad():
        layer(x)
    assert layer.resolved_backend == "grouped"
    layer(x)  # autograd on: training signature
    assert layer.resolved_backend == "dense"
    layer.backend = "blocked"
    layer(x)
    assert layer.resolved_backend == "blocked" and layer.backend == "blocked"


def test_resolve_backends_lists_pins_and_leaves_the_model_untouched():
    model = vgg16_cifar(part=2).train()
    stats = model.features[1].running_mean.clone()
    x = torch.randn(4, 3, 32, 32)
    resolved = autotune.resolve_backends(model, x)
    assert len(resolved) == 12 and set(resolved.values()) <= set(autotune.candidates("cpu"))
    assert model.training and all(m.training for m in model.modules()), "train/eval flags must be restored"
    assert torch.equal(model.features[1].running_mean, stats), "BatchNorm statistics must not change"
    assert all(m.backend == "auto" for name, m in model.named_modules() if name in resolved)
    pinned = autotune.resolve_backends(model, x, training=True, pin=True)
    assert all(model.get_submodule(name).backend == b for name, b in pinned.items())
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        autotune.resolve_backends("vgg", x)


def test_the_model_prices_a_strided_layer_by_its_output_pixels(stock_only, monkeypatch):
    """estimate() counts output pixels: a stride-2 layer on 8x8 inputs computes 4x4 outputs."""
    seen = []
    estimate = autotune.estimate
    monkeypatch.setattr(autotune, "estimate", lambda p, pixels, t: seen.append(pixels) or estimate(p, pixels, t))
    x = torch.randn(8, 128, 8, 8).contiguous(memory_format=CL)
    with autotune.mode("model"):
        autotune.choose(HetConvPattern(128, 128, 2), x, training=False, stride=(2, 2))
    assert seen == [8 * 4 * 4], f"priced {seen} pixels, expected the {8 * 4 * 4} output pixels"


def test_a_choice_under_autocast_is_not_served_without_it():
    """The signature holds the precision the call computes in: under CPU autocast to bfloat16 a
    float32 input is another signature than the same input without autocast."""
    pattern = HetConvPattern(64, 64, 2)
    x = torch.randn(2, 64, 4, 4).contiguous(memory_format=CL)
    plain = autotune.signature(pattern, x, False, (1, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = autotune.signature(pattern, x, False, (1, 1))
    assert plain != mixed


@pytest.mark.parametrize("weights_format", [CL, torch.contiguous_format])
def test_the_timing_lays_out_its_weights_as_the_layer_has_them(monkeypatch, weights_format):
    """A confirm timing runs on random weights with the layer's own strides, and the choice is kept
    per weight layout: the fused kernel reads channels-last k x k weights in place for a few output
    pixels and lays contiguous ones out first, so timing contiguous weights for a channels-last layer
    (as it once did) measured the wrong kernel (blocked kept, 2.3x slower, at P = 2, batch 1)."""
    made = []
    original = autotune._random
    monkeypatch.setattr(autotune, "_random", lambda *args: made.append(original(*args)) or made[-1])
    layer = SparseHetConv2d(32, 32, part=2).to(memory_format=weights_format).eval()
    x = torch.randn(1, 32, 2, 2).contiguous(memory_format=CL)
    with torch.no_grad(), autotune.mode("measure"):  # (confirm times only where the model proposes)
        layer(x)
    assert [t.stride() for t in made] == [layer.weight_kxk.stride(), layer.weight_1x1.stride()], \
        "the timing's random weights are laid out as the layer's"
    key = autotune.signature(layer.pattern, x, False, (1, 1), (layer.weight_kxk, layer.weight_1x1))
    assert key in autotune.choices()
    other = layer.weight_kxk.contiguous(memory_format=torch.contiguous_format if weights_format == CL else CL)
    assert autotune.signature(layer.pattern, x, False, (1, 1), (other, layer.weight_1x1)) != key, \
        "another weight layout is another signature"
    assert autotune._weight_strides((layer.weight_kxk[:, ::2], layer.weight_1x1)) == \
        (None, layer.weight_1x1.stride()), "a layout empty_strided cannot reproduce is timed contiguous"
