"""Conversion by probing (sparse_hetconv.probing; to_sparse(probe=...); sparse-hetconv convert --probe).

The conformance set (tests/probe_forms.py, HetConv written from descriptions only) converts exactly,
goes back with to_masked / to_shifted and is counted the paper's way; modules that are not a HetConv
are refused with one error naming their path, the model untouched.
"""

from __future__ import annotations

import copy
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

from helpers import oracle_of
from published import Efficient_HetConv2d
from probe_forms import BranchHetConv, MaskedDense, ShuffledPair, SubtractDiagonal, net
from sparse_hetconv import (ChannelPermutation, MaskedHetConv2d, SparseHetConv2d, SparseHetConv3d, cli, count_macs,
                            from_shifted, shifted_mask, to_masked, to_shifted, to_sparse)
from sparse_hetconv.checkpoint import load_model
from sparse_hetconv.probing import Probe, find_groups, read_convolution

pytestmark = pytest.mark.usefixtures("one_thread")

# name: (factory, part, stride, kernel) -- every form of the issue, strides 1 and 2 where it has them
FORMS = {
    "branch-stride1-bias": (lambda: BranchHetConv(16, 24, 4, bias=True), 4, 1, 3),
    "branch-stride2": (lambda: BranchHetConv(16, 8, 4, stride=2), 4, 2, 3),
    "subtract-diagonal-k5-p32": (lambda: SubtractDiagonal(64, 64, 32, kernel_size=5), 32, 1, 5),
    "dense-times-shifted-mask": (lambda: MaskedDense(12, 12, 3, stride=2), 3, 2, 3),
    "grouped-pointwise-shuffle": (lambda: ShuffledPair(16, 16, 4), 4, 1, 3),
}
EXACT = {torch.float32: 1e-5, torch.float64: 1e-12}


def relative(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def pieces(converted, in_channels, out_channels):
    """The sparse layer of a probed module and its permutations: ``converted(x) ==
    layer(x[:, p_in])[:, q_out]``."""
    if isinstance(converted, SparseHetConv2d):
        return converted, torch.arange(in_channels), torch.arange(out_channels)
    p_in = converted.permute_in.perm if hasattr(converted, "permute_in") else torch.arange(in_channels)
    q_out = converted.permute_out.perm if hasattr(converted, "permute_out") else torch.arange(out_channels)
    return converted.layer, p_in, q_out


def untouched(model, before, what):
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), f"{what}: the model changed"


# -- the conformance set ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(FORMS))
def test_every_form_converts_exactly_round_trips_and_counts_the_papers_way(name, dtype):
    factory, part, stride, k = FORMS[name]
    torch.manual_seed(0)
    source = factory().to(dtype).eval()
    weight, bias = source.dense()  # worked out by hand from the description
    n_out, n_in = weight.shape[:2]
    converted, report = to_sparse(source, probe=[type(source)], memory_format=None, return_report=True)
    assert report.probed == [""] and report.replaced == [""] and "(1 by probing)" in str(report), report
    layer, p_in, q_out = pieces(converted, n_in, n_out)
    assert (layer.part, layer.stride, layer.kernel_size) == (part, (stride,) * 2, (k,) * 2), layer
    assert layer.weight_kxk.dtype == dtype and not layer.training, "dtype and eval mode kept"

    x = torch.randn(3, n_in, 11, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        assert relative(converted(x.to(dtype)), source(x.to(dtype))) <= EXACT[dtype], f"{name}: not exact"
        expected = F.conv2d(x, weight, bias, stride, k // 2)
        by_definition = oracle_of(copy.deepcopy(layer).double(), x[:, p_in])[:, q_out]
    assert relative(by_definition, expected) <= EXACT[dtype], f"{name}: the layer read differs from the description"

    with torch.no_grad():
        masked = to_masked(converted, memory_format=None)
        assert relative(masked(x.to(dtype)), source(x.to(dtype))) <= EXACT[dtype], f"{name}: to_masked"
        back = to_sparse(masked, memory_format=None)
        assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), converted.state_dict().values()))
        shifted = to_shifted(converted, memory_format=None)
        assert relative(shifted(x.to(dtype)), source(x.to(dtype))) <= EXACT[dtype], f"{name}: to_shifted"
        again = from_shifted(shifted, part=part, skip_first=False, memory_format=None)
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), converted.state_dict().values()))

    height, width = -(-11 // stride), -(-10 // stride)
    m = n_in // part
    assert count_macs(converted, (1, n_in, 11, 10), norm=False) == \
        height * width * n_out * (k * k * m + n_in - m), f"{name}: not the paper's count"


@pytest.mark.parametrize("form", ["BranchHetConv", "MaskedDense", "ShuffledPair", "SubtractDiagonal"])
def test_in_a_network_the_permutations_are_absorbed(form):
    torch.manual_seed(0)
    source = net(form, width=16, p=4, stride=2).double().eval()
    for bn in (source[1], source[4]):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    converted, report = to_sparse(source, probe=f"probe_forms:{form}", return_report=True)
    assert report.probed == ["3"] and report.permutations == [], report
    assert not any(isinstance(m, ChannelPermutation) for m in converted.modules()), converted
    assert isinstance(converted[3], SparseHetConv2d)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        assert relative(converted(x), source(x)) <= 1e-12


def test_probe_by_class_by_import_path_by_module_path_or_with_settings():
    torch.manual_seed(0)
    model = net("BranchHetConv", stride=2).eval()
    for probe in (BranchHetConv, [BranchHetConv], "probe_forms:BranchHetConv", "3", ["3"],
                  Probe(BranchHetConv, stride=2, in_channels=16, kernel_size=3, part=4)):
        _, report = to_sparse(model, probe=probe, return_report=True)
        assert report.probed == ["3"], f"probe={probe!r}: {report}"
    with pytest.raises(ValueError, match=r"probe \('9'\): the model has no module at that path"):
        to_sparse(model, probe="9")
    with pytest.raises(ValueError, match=r"probe \('probe_forms:Nope'\): 'probe_forms' has no attribute 'Nope'"):
        to_sparse(model, probe="probe_forms:Nope")
    with pytest.raises(TypeError, match=r"probe target must be an nn.Module class, .* got int \(3\)"):
        to_sparse(model, probe=[3])
    with pytest.raises(ValueError, match=r"part \(0\) must be an int >= 1"):
        Probe(BranchHetConv, part=0)
    with pytest.warns(UserWarning, match=r"to_sparse: probe 'ShuffledPair' matched no module"):
        to_sparse(model, probe=[BranchHetConv, ShuffledPair])


def test_the_report_says_which_layers_were_read_by_layout_and_which_by_probing():
    torch.manual_seed(0)
    model = nn.Sequential(MaskedHetConv2d(16, 16, part=4), nn.ReLU(), BranchHetConv(16, 16, 4)).eval()
    converted, report = to_sparse(model, probe=[BranchHetConv], return_report=True)
    assert report.replaced == ["0", "2"] and report.probed == ["2"], report
    assert "replaced 0\n" in str(report) + "\n" and "replaced 2 (probed)" in str(report), str(report)
    with pytest.warns(UserWarning, match="no layer to convert"):
        _, plain = to_sparse(nn.Sequential(ShuffledPair(8, 8, 2)), return_report=True)
    assert "probe=[ShuffledPair] reads it from its responses" in plain.skipped["0"], "the skip says what to do"


def test_a_layout_module_probed_gives_the_weights_its_layout_gives():
    torch.manual_seed(0)
    for module in (Efficient_HetConv2d(64, 32, p=32), MaskedHetConv2d(16, 8, part=4, stride=2, bias=True)):
        module = module.double().eval()
        by_layout, by_probing = to_sparse(module), to_sparse(module, probe=[type(module)])
        for key, value in by_layout.state_dict().items():
            torch.testing.assert_close(by_probing.state_dict()[key], value, rtol=1e-13, atol=1e-15,
                                       msg=lambda m: f"{type(module).__name__}.{key}: {m}")


# -- what is refused ------------------------------------------------------------------------------------
class Nonlinear(BranchHetConv):
    def forward(self, x):
        return torch.relu(super().forward(x))


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = MaskedDense(8, 8, 4), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x))


class WithDropout(WithBatchNorm):
    def forward(self, x):
        return F.dropout(self.conv(x), 0.5, self.training)


class Flipped(MaskedDense):
    def forward(self, x):
        return super().forward(x.flip(-1))


def almost_shifted(extra):
    """A dense convolution under the shifted mask with ``extra`` taps outside it."""
    layer = MaskedDense(16, 16, 4)
    layer.mask[torch.arange(extra), (torch.arange(extra) + 1) % 16, 0, 0] = 1
    return layer


REFUSED = {
    "not linear": (lambda: Nonlinear(8, 8, 4), r"cannot be read as a convolution: it is not linear \(f\(x \+ y\)"),
    "BatchNorm in training mode": (lambda: WithBatchNorm().train(),
                                   r"changes its buffer 'bn.running_mean' \(BatchNorm2d\) when called: a module with "
                                   r"state, such as a BatchNorm in training mode, is not a convolution"),
    "random": (lambda: WithDropout().train(), r"its output changes from one call to the next on the same input"),
    "not a convolution": (lambda: Flipped(8, 8, 4), r"it is linear but not a convolution with kernel \(3, 3\)"),
    "depthwise": (lambda: nn.Conv2d(16, 16, 3, padding=1, groups=16),
                  r"is a grouped convolution \(groups=16\): every filter reads its own 1 channels only and has no "
                  r"1x1 kernels"),
    "dense": (lambda: nn.Conv2d(16, 16, 3, padding=1),
              r"is not a HetConv: its k x k taps link 16 of its 16 filters and 16 of its 16 input channels into one "
              r"group, which does not split into P >= 2 equal blocks"),
    "taps outside the pattern": (lambda: almost_shifted(3), r"is not a HetConv: .*; with part=4, taps outside the "
                                                            r"shifted pattern on 3 of 16 filters"),
    "wrong stride guess": (lambda: Probe(BranchHetConv, stride=1), r"stride \(1, 1\) was given, but for a 24x24 "
                                                                   r"input it returns 12x12, as stride \(2, 2\) does"),
    "wrong padding": (lambda: nn.Conv2d(8, 8, 3, padding=0), r"for a 24x24 input it returns 22x22, which no stride "
                                                            r"gives at padding \(1, 1\)"),
    "no input it accepts": (lambda: Probe(BranchHetConv, in_channels=12),
                            r"its forward accepts none of the input channel counts tried \(12; the last failed with "),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_is_not_a_hetconv_is_refused_by_path_and_the_model_is_untouched(case):
    make, message = REFUSED[case]
    torch.manual_seed(0)
    made = make()
    layer = BranchHetConv(16, 16, 4, stride=2) if isinstance(made, Probe) else made
    probe = made if isinstance(made, Probe) else "2"
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), layer)
    modes = [m.training for m in model.modules()]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"module '2' \({type(layer).__name__}\).*{message}"):
        to_sparse(model, probe=probe, inplace=True)
    untouched(model, before, case)
    assert model[2] is layer and [m.training for m in model.modules()] == modes, f"{case}: the model changed"


def test_batchnorm_in_eval_mode_is_read_with_it():
    torch.manual_seed(0)
    module = WithBatchNorm().double().eval()
    module.bn.running_mean.uniform_(-1, 1), module.bn.running_var.uniform_(0.5, 2)
    converted = to_sparse(module, probe=[WithBatchNorm])
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert relative(converted(x), module(x)) <= 1e-12


# -- what a demanding user expects ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dtype_device_and_train_eval_flags_are_kept(dtype):
    torch.manual_seed(0)
    model = net("BranchHetConv").to(dtype)
    model[3].train(), model[0].eval()
    modes = {path: m.training for path, m in model.named_modules()}
    converted = to_sparse(model, probe=BranchHetConv)
    layer = converted[3]
    assert isinstance(layer, SparseHetConv2d) and layer.weight_kxk.dtype == dtype
    assert layer.weight_kxk.device == model[0].weight.device and layer.training
    assert all(m.training == modes[path] for path, m in converted.named_modules() if path in modes), "modes kept"


def test_hooks_do_not_fire_and_follow_the_module_with_its_permutations_kept():
    torch.manual_seed(0)
    model = net("BranchHetConv").double().eval()
    seen = []
    model[3].register_forward_hook(lambda module, args, output: seen.append(output.detach().clone()))
    model[3].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    converted, report = to_sparse(model, probe=BranchHetConv, return_report=True)
    assert seen == [], "no hook may fire during a conversion"
    assert report.hooks == ["3"] and report.permutations == ["3.permute_in", "3.permute_out"], report
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        model(x)
        converted(x)
    assert len(seen) == 4 and all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(seen[:2], seen[2:])), \
        "the hooks see the tensors they saw before"


def test_a_module_used_twice_is_probed_once_and_stays_shared():
    torch.manual_seed(0)
    block = BranchHetConv(16, 16, 4)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), block, nn.ReLU(), block).double().eval()
    converted, report = to_sparse(model, probe="1", return_report=True)
    assert report.probed == ["1"] and report.shared == {"1": ["3"]} and converted[1] is converted[3], report
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        assert relative(converted(x), model(x)) <= 1e-12


class Counted(BranchHetConv):
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


@pytest.mark.parametrize("stride", [1, 2])
def test_impulses_are_batched_the_calls_do_not_grow_with_the_channels(stride):
    calls = []
    for width in (8, 64):
        Counted.calls = 0
        to_sparse(Counted(width, width, 4, stride=stride).double(), probe=[Counted], memory_format=None)
        calls.append(Counted.calls)
    assert calls[0] == calls[1] <= 12, f"forward calls at 8 and 64 channels: {calls}"


def test_read_convolution_and_find_groups_on_their_own():
    torch.manual_seed(0)
    module = ShuffledPair(8, 8, 2, stride=2).double()
    weight, bias, stride = read_convolution(module, "m")
    expected_weight, expected_bias = module.dense()
    assert stride == (2, 2) and torch.allclose(weight, expected_weight, rtol=0, atol=1e-15)
    assert torch.allclose(bias, expected_bias, rtol=0, atol=1e-15)
    part, p_in, p_out = find_groups(weight, "m")
    assert part == 2 and p_in.tolist() == list(range(8)) and p_out.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_zeroed_kernels_still_fit_and_a_given_part_is_kept():
    torch.manual_seed(0)
    module = MaskedDense(16, 16, 4).double()
    with torch.no_grad():
        module.conv.weight[5] = 0  # a pruned filter: linked to no channel
        module.conv.weight[:, 2, :, :] = 0  # a channel no filter reads
    converted = to_sparse(module, probe=[MaskedDense], memory_format=None)
    forced = to_sparse(module, probe=[Probe(MaskedDense, part=2)], memory_format=None)
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    for new, part in ((converted, 4), (forced, 2)):
        assert pieces(new, 16, 16)[0].part == part, new
        with torch.no_grad():
            assert relative(new(x), module(x)) <= 1e-12, f"part {part}"


def test_a_stride_the_output_size_cannot_tell_must_be_given():
    module = MaskedDense(8, 8, 4, stride=6).double()
    with pytest.raises(ValueError, match=r"returns 4x4, which several strides give; pass stride"):
        to_sparse(module, probe=[MaskedDense])
    converted = to_sparse(module, probe=[Probe(MaskedDense, stride=6)], memory_format=None)
    x = torch.randn(1, 8, 13, 13, dtype=torch.float64)
    with torch.no_grad():
        assert relative(converted(x), module(x)) <= 1e-12


# -- properties ------------------------------------------------------------------------------------------
@given(part=st.sampled_from([2, 3, 4]), blocks_in=st.integers(1, 3), blocks_out=st.integers(1, 3),
       kernel=st.sampled_from([3, 5]), stride=st.sampled_from([1, 2]), bias=st.booleans(),
       form=st.sampled_from(["branch", "masked", "masked3d"]), seed=st.integers(0, 99))
def test_any_shape_converts_exactly(part, blocks_in, blocks_out, kernel, stride, bias, form, seed):
    torch.manual_seed(seed)
    n_in, n_out = part * blocks_in, part * blocks_out
    if form == "branch":
        module = BranchHetConv(n_in, n_out, part, kernel, stride, bias)
    elif form == "masked":
        module = MaskedDense(n_in, n_out, part, kernel, stride, bias)
    else:
        module = nn.Conv3d(n_in, n_out, kernel, stride, kernel // 2, bias=bias)
        with torch.no_grad():
            module.weight.mul_(shifted_mask(n_in, n_out, part, kernel, dims=3))
    module = module.double()
    converted = to_sparse(module, probe=[type(module)], memory_format=None)
    layer = converted if isinstance(converted, (SparseHetConv2d, SparseHetConv3d)) else converted.layer
    assert (layer.part, layer.stride) == (part, (stride,) * (3 if form == "masked3d" else 2)), layer
    x = torch.randn((2, n_in) + (5,) * (3 if form == "masked3d" else 2), dtype=torch.float64)
    with torch.no_grad():
        assert relative(converted(x), module(x)) <= 1e-12, f"{form} M={n_in} N={n_out} P={part} k={kernel} s={stride}"


# -- the command line ------------------------------------------------------------------------------------
@pytest.fixture
def isolated(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_convert_command_probes_the_named_class_and_load_model_reads_it_back(tmp_path, capsys, isolated):
    torch.manual_seed(0)
    model = net("BranchHetConv", stride=2).eval()
    source, target = tmp_path / "branch.pt", tmp_path / "sparse.pt"
    torch.save({"state_dict": model.state_dict()}, source)
    args = ["convert", str(source), str(target), "--model", "probe_forms:net", "--model-arg", "stride=2",
            "--input-size", "3,8,8"]
    assert cli.main(args + ["--probe", "probe_forms:BranchHetConv,stride=2,part=4"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "converted 1 layers (1 by probing); channel permutations left at run time: none" in out, out
    loaded, info = load_model(target, "probe_forms:net", model_kwargs={"stride": 2},
                              probe=["probe_forms:BranchHetConv"])
    assert info["form"] == "sparse" and info["part"] == 4 and isinstance(loaded[3], SparseHetConv2d)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert relative(loaded(x), model(x)) <= 1e-5
    for probe, message in (("3,stride=1", r"module '3' \(BranchHetConv\): stride \(1, 1\) was given"),
                           ("probe_forms:Nope", r"probe \('probe_forms:Nope'\): 'probe_forms' has no attribute"),
                           ("3,speed=2", r"--probe \('3,speed=2'\): unknown setting 'speed'"),
                           ("3,stride=x", r"--probe \('3,stride=x'\): stride must be an int")):
        assert cli.main(args + ["--force", "--probe", probe]) == 2, probe
        err = capsys.readouterr().err
        assert err.startswith("sparse-hetconv convert: error: ") and "Traceback" not in err, err
        assert err.count("\n") == 1 and re.search(message, err), err
