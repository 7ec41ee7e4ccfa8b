"""The export forms of a HetConv layer (sparse_hetconv/deploy/forms.py) against the definition oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import assert_close, oracle_of
from models import small_net, with_statistics
from sparse_hetconv import SparseHetConv2d, SparseHetConv3d, to_masked
from sparse_hetconv.deploy import FORMS, ExportHetConv2d, export_form


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", [(8, 12, 4, 3, 1, True), (12, 9, 3, 5, 2, False), (16, 16, 16, 3, 1, True),
                                  (6, 6, 1, 3, 2, True), (8, 8, 2, 1, 1, False)])
def test_every_form_computes_the_layer(form, case):
    M, N, P, k, stride, bias = case
    torch.manual_seed(0)
    layer = SparseHetConv2d(M, N, P, k, stride, bias=bias, dtype=torch.float64)
    x = torch.randn(2, M, 7, 6, dtype=torch.float64)
    exported = ExportHetConv2d(layer, form)
    assert not any(p.requires_grad for p in exported.parameters()), "an export form holds frozen weights"
    assert_close(exported(x), oracle_of(layer, x), f"{form} {case}")


class GwcPwc(nn.Module):
    """The published layer as its script writes it: gwc(x) + pwc(x) (the mask kept by the training loop)."""

    def __init__(self, masked) -> None:
        super().__init__()
        self.gwc, self.pwc = masked.gwc, masked.pwc

    def forward(self, x):
        return self.gwc(x) + self.pwc(x)


def _published(model):
    for name, module in list(model.named_children()):
        if type(module).__name__ == "MaskedHetConv2d":
            setattr(model, name, GwcPwc(module))
    return model


@pytest.mark.parametrize("source", ["sparse", "masked", "published"])
def test_export_form_of_a_model_in_any_form_matches_it(source):
    sparse = with_statistics(small_net(form="sparse"))
    model = {"sparse": sparse, "masked": to_masked(sparse, memory_format=None),
             "published": _published(to_masked(sparse, memory_format=None))}[source].eval()
    x = torch.randn(3, 3, 16, 16)
    for form in FORMS:
        exported = export_form(model, form)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in exported.modules()), "BatchNorms are folded"
        assert sum(isinstance(m, ExportHetConv2d) for m in exported.modules()) == 2
        with torch.no_grad():
            assert_close(exported(x), model(x), f"{source} as {form}", rtol=1e-4, atol=1e-5)
    assert model.training is False and any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), \
        "the source must not change"


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"form \('fast'\) must be one of"):
        export_form(small_net(), "fast")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        export_form("vgg16")
    with pytest.raises(TypeError, match="layer must be a SparseHetConv2d"):
        ExportHetConv2d(nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="3-D HetConv layer"):
        export_form(nn.Sequential(SparseHetConv3d(8, 8, 2)))
