"""Saving, loading, copying and moving HetConv models: state_dicts (``weights_only=True``),
``to_sparse`` outputs, ``copy.deepcopy``, pickling whole models, ``.to(device, dtype)`` and
channels-last.

The pattern's index tensors are derived from (M, N, P) and cached per device in pattern.py and
functional.py; they are never module state, so the tests also check that no index tensor or
prepared weight travels with a model. Tolerances: reloading, copying and pickling are exact
(``torch.equal``); float64 against the definition oracle 1e-10; a layout change (channels-last) or
a float32 comparison against float64 runs other kernels, so rtol 1e-4 / atol 1e-5.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from helpers import DEVICES, assert_close, masked_reference_weights, oracle, oracle_of
from sparse_hetconv import MaskedHetConv2d, SparseHetConv2d, to_masked, to_sparse
from helpers import BACKENDS
from sparse_hetconv.models import vgg16_cifar

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BATCH = (2, 3, 32, 32)


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm running statistics non-default values (a few train-mode passes)."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(BATCH))
    return model.eval()


def round_trip(obj, **load_kwargs):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, **load_kwargs)


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("form", ["sparse", "masked"])
def test_state_dict_weights_only_round_trip(form):
    torch.manual_seed(0)
    model = randomised(vgg16_cifar(part=4, form=form))
    state = round_trip(model.state_dict(), weights_only=True)
    torch.manual_seed(1)
    fresh = vgg16_cifar(part=4, form=form).eval()
    fresh.load_state_dict(state)  # strict
    x = torch.randn(BATCH)
    assert torch.equal(outputs(fresh, x), outputs(model, x)), f"{form}: reloaded model computes something else"


def test_sparse_state_dict_holds_only_the_existing_kernels():
    layer = SparseHetConv2d(16, 32, part=4, bias=True)
    with torch.no_grad():
        layer(torch.randn(1, 16, 4, 4))
    state = layer.state_dict()
    assert sorted(state) == ["bias", "weight_1x1", "weight_kxk"], f"unexpected state keys {sorted(state)}"
    assert tuple(state["weight_1x1"].shape) == (32, 12), "compact values: N x (M - M/P)"
    assert list(layer.buffers()) == [], "index tensors are derived from (M, N, P), never buffers"


def test_to_sparse_output_saves_and_loads():
    """The state_dict of a converted model loads (weights_only) into a freshly built sparse model,
    and the round trip through to_masked loads into a freshly built masked one."""
    torch.manual_seed(0)
    masked = randomised(vgg16_cifar(part=4, form="masked"))
    sparse = to_sparse(masked)
    torch.manual_seed(1)
    fresh = vgg16_cifar(part=4, form="sparse").eval()
    fresh.load_state_dict(round_trip(sparse.state_dict(), weights_only=True))
    x = torch.randn(BATCH)
    assert torch.equal(outputs(fresh, x), outputs(sparse, x)), "reloaded to_sparse output differs"
    assert_close(outputs(fresh, x), outputs(masked, x), "sparse (reloaded) vs masked", rtol=1e-4, atol=1e-5)
    back = vgg16_cifar(part=4, form="masked").eval()
    back.load_state_dict(round_trip(to_masked(fresh).state_dict(), weights_only=True))
    assert_close(outputs(back, x), outputs(masked, x), "masked -> sparse -> masked", rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", ["sparse", "masked"])
def test_deepcopy_is_independent(form):
    torch.manual_seed(0)
    model = randomised(vgg16_cifar(part=4, form=form, backend="dense") if form == "sparse"
                       else vgg16_cifar(part=4, form=form))
    x = torch.randn(BATCH)
    before = outputs(model, x)
    twin = copy.deepcopy(model)
    assert torch.equal(outputs(twin, x), before), f"{form}: deepcopy computes something else"
    shared = {p.data_ptr() for p in model.parameters()} & {p.data_ptr() for p in twin.parameters()}
    assert not shared, "deepcopy must not share parameter storage"
    with torch.no_grad():  # change every parameter of the copy: only the copy's output may move
        for p in twin.parameters():
            p.mul_(0.5)
    assert not torch.allclose(outputs(twin, x), before), "the copy's output must follow its own weights"
    assert torch.equal(outputs(model, x), before), "changing the copy changed the original"


@pytest.mark.parametrize("form", ["sparse", "masked"])
def test_pickle_whole_model(form):
    torch.manual_seed(0)
    model = randomised(vgg16_cifar(part=4, form=form))
    x = torch.randn(BATCH)
    expected = outputs(model, x)
    for name, loaded in (("torch.save", round_trip(model, weights_only=False)),
                         ("pickle", pickle.loads(pickle.dumps(model)))):
        assert type(loaded) is type(model)
        assert torch.equal(outputs(loaded, x), expected), f"{form}: {name} of the whole model changed it"


def test_pickles_carry_no_prepared_weights():
    """Nothing derived from the weights is kept on a layer: a model pickles to the same size
    before and after inference calls (a few bytes: each layer records its resolved backend)."""
    torch.manual_seed(0)
    model = vgg16_cifar(part=4, backend="dense").eval()
    size = len(pickle.dumps(model))
    outputs(model, torch.randn(BATCH))
    growth = len(pickle.dumps(model)) - size
    assert growth < 1024, f"the pickle grew by {growth} bytes after inference calls: prepared weights?"


def make_layer(form: str) -> nn.Module:
    torch.manual_seed(0)
    if form == "masked":
        return MaskedHetConv2d(16, 32, part=4, stride=2, bias=True)
    return SparseHetConv2d(16, 32, part=4, stride=2, bias=True, backend=form)


def layer_oracle(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, MaskedHetConv2d):
        return oracle(x, *masked_reference_weights(layer), layer.stride, layer.part)
    return oracle_of(layer, x)


def one_by_one_weight(layer: nn.Module) -> torch.Tensor:
    return layer.pwc.weight if isinstance(layer, MaskedHetConv2d) else layer.weight_1x1


@pytest.mark.parametrize("form", list(BACKENDS) + ["masked"])
def test_to_dtype(form):
    layer = make_layer(form)
    x = torch.randn(2, 16, 9, 9)
    float32 = outputs(layer, x)
    layer.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    got = outputs(layer, x.double())
    assert_close(got, layer_oracle(layer, x.double()), f"{form}: float64 layer vs oracle", rtol=1e-10, atol=1e-12)
    assert_close(got.float(), float32, f"{form}: float64 vs float32 layer", rtol=1e-4, atol=1e-5)
    layer.to(torch.float32)
    assert torch.equal(outputs(layer, x), float32), f"{form}: float32 -> float64 -> float32 is exact"


@pytest.mark.parametrize("form", list(BACKENDS) + ["masked"])
def test_channels_last(form):
    layer = make_layer(form)
    last = copy.deepcopy(layer).to(memory_format=torch.channels_last)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in last.parameters() if p.dim() == 4)
    x = torch.randn(2, 16, 9, 9)
    x_last = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    x = x.requires_grad_()
    y, y_last = layer(x), last(x_last)
    assert_close(y_last, y, f"{form}: channels-last output", rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_last.backward(g)
    assert_close(x_last.grad, x.grad, f"{form}: channels-last input gradient", rtol=1e-4, atol=1e-5)
    assert_close(one_by_one_weight(last).grad, one_by_one_weight(layer).grad,
                 f"{form}: channels-last 1 x 1 weight gradient", rtol=1e-4, atol=1e-5)


def test_channels_last_vgg16_matches_nchw():
    torch.manual_seed(0)
    nchw = randomised(vgg16_cifar(part=4, memory_format=None))
    last = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    x = torch.randn(BATCH)
    assert_close(outputs(last, x.contiguous(memory_format=torch.channels_last)), outputs(nchw, x),
                 "channels-last VGG-16", rtol=1e-4, atol=1e-5)


@CUDA
@pytest.mark.parametrize("form", ["sparse", "masked"])
def test_to_cuda_and_back(form):
    torch.manual_seed(0)
    model = randomised(vgg16_cifar(part=4, form=form))
    x = torch.randn(BATCH)
    expected = outputs(model, x)
    model.to("cuda", torch.float64)
    assert all(p.device.type == "cuda" and p.dtype == torch.float64 for p in model.parameters())
    assert_close(outputs(model, x.to("cuda", torch.float64)).cpu().float(), expected, f"{form} on CUDA",
                 rtol=1e-4, atol=1e-5)
    model.to("cpu", torch.float32)
    assert_close(outputs(model, x), expected, f"{form} back on the CPU", rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("form", [b for b in BACKENDS if b != "torch_sparse"] + ["masked"])
def test_to_meta_device(form):
    """A second device without a GPU: the index tensors are derived for the layer's new device
    (``meta`` checks shapes and devices only; torch.sparse has no meta kernels)."""
    layer = make_layer(form).to("meta")
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            y = layer(torch.randn(2, 16, 9, 9, device="meta"))
        assert y.device.type == "meta" and tuple(y.shape) == (2, 32, 5, 5), f"{form}: {y.device}, {tuple(y.shape)}"
    assert layer.pattern.flat_indices("meta").device.type == "meta"


@pytest.mark.parametrize("device", DEVICES)
def test_masked_layer_survives_a_move(device):
    """The masked layer's mask is derived per device too: moving it keeps the diagonal zero."""
    torch.manual_seed(0)
    layer = MaskedHetConv2d(8, 8, part=4).to(device, torch.float64)
    x = torch.randn(1, 8, 5, 5, device=device, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    diagonal = layer.pattern.block_diagonal(layer.pwc.weight.grad.view(8, 8))
    assert torch.count_nonzero(diagonal) == 0, "the block diagonal must get zero gradient after a move"
