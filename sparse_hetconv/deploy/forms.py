"""HetConv layers as stock operators: what exporters, quantizers and inference runtimes see.

A runtime (ONNX Runtime, OpenVINO, Inductor after PT2E quantization) has no HetConv operator; the
layer reaches it as one of these exact compositions of stock ones (docs/deploy.md has the table and
what each costs; docs/design.md §4): ``"masked"`` (grouped k x k + a 1 x 1 over the scattered
``N x M`` matrix), ``"folded"`` (the same, the k x k centre taps folded into the 1 x 1 matrix),
``"shifted"`` (grouped k x k + ``P - 1`` grouped 1 x 1 convolutions over the input rotated by
``s`` blocks: useful multiplies only) and ``"dense"`` (one k x k convolution holding the zeros).

:func:`export_form` replaces every HetConv layer of a model (any form :func:`~sparse_hetconv.to_sparse`
reads) by one of them, after folding BatchNorms (:func:`~sparse_hetconv.fuse_bn`).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from .._checks import check_model
from ..batchnorm import fuse_bn
from ..convert import to_sparse
from ..sparse import SparseHetConv2d

__all__ = ["FORMS", "ExportHetConv2d", "export_form", "hetconv_layers"]

FORMS = ("masked", "folded", "shifted", "dense")


class ExportHetConv2d(nn.Module):
    """One 2-D HetConv layer as stock convolutions (see the module docstring for ``form``).

    Built from a :class:`~sparse_hetconv.SparseHetConv2d` (:meth:`from_sparse`); computes what it
    computes, up to float32 rounding. Its convolutions are ``nn.Conv2d`` children (quantizers
    annotate convolutions by the module they come from) with frozen weights
    (``requires_grad=False``), so it is for inference.
    """

    def __init__(self, layer: SparseHetConv2d, form: str = "masked") -> None:
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form ({form!r}) must be one of {FORMS}")
        if not isinstance(layer, SparseHetConv2d):
            raise TypeError(f"layer must be a SparseHetConv2d, got {type(layer).__name__}")
        if not layer.default_geometry:
            raise ValueError(f"{layer} has padding {layer.padding}, dilation {layer.dilation} and padding_mode "
                             f"{layer.padding_mode!r}; the export forms are built for padding kernel_size // 2, "
                             "dilation 1 and zero padding only")
        p = layer.pattern
        self.form, self.part = form, p.part
        self.in_channels, self.out_channels = p.in_channels, p.out_channels
        stride, padding, kernel = tuple(layer.stride), tuple(k // 2 for k in p.kernel_size), p.kernel_size
        M, N, P, n, m = p.in_channels, p.out_channels, p.part, p.block_out, p.block_in
        factory = {"device": layer.weight_kxk.device, "dtype": layer.weight_kxk.dtype}
        bias = layer.bias is not None

        def conv(cin, cout, size, pad, groups, with_bias):
            return nn.Conv2d(cin, cout, size, stride, pad, groups=groups, bias=with_bias, **factory)

        with torch.no_grad():
            kxk = layer.weight_kxk.detach().clone()
            dense = layer.dense_1x1().detach().clone() if P > 1 else kxk.new_zeros(N, M)
            centre = (slice(None), slice(None)) + p.centre
            if form == "folded":
                for g in range(P):
                    dense[g * n:(g + 1) * n, g * m:(g + 1) * m] = kxk[g * n:(g + 1) * n][centre]
                kxk[centre] = 0
            if form == "dense":
                self.conv = conv(M, N, kernel, padding, 1, bias)
                full = kxk.new_zeros((N, M) + kernel)
                for g in range(P):
                    full[g * n:(g + 1) * n, g * m:(g + 1) * m] = kxk[g * n:(g + 1) * n]
                full[centre] += dense
                self.conv.weight.copy_(full)
                if bias:
                    self.conv.bias.copy_(layer.bias)
            else:
                self.gwc = conv(M, N, kernel, padding, P, bias)
                self.gwc.weight.copy_(kxk)
                if bias:
                    self.gwc.bias.copy_(layer.bias)
            if form in ("masked", "folded"):
                self.pwc = conv(M, N, 1, 0, 1, False)
                self.pwc.weight.copy_(dense.reshape(N, M, 1, 1))
            if form == "shifted":
                # Offset s: output block h reads input block (h + s) mod P, as a grouped 1 x 1
                # convolution of the input rotated by s blocks.
                self.shifts = nn.ModuleList()
                for s in range(1, P):
                    shift = conv(M, N, 1, 0, P, False)
                    for h in range(P):
                        src = (h + s) % P
                        shift.weight[h * n:(h + 1) * n, :, 0, 0] = dense[h * n:(h + 1) * n, src * m:(src + 1) * m]
                    self.shifts.append(shift)
        self.requires_grad_(False)

    @classmethod
    def from_sparse(cls, layer: SparseHetConv2d, form: str = "masked") -> "ExportHetConv2d":
        """The export form of a sparse layer (a copy: the layer is not changed)."""
        return cls(layer, form)

    def forward(self, x: Tensor) -> Tensor:
        if self.form == "dense":
            return self.conv(x)
        y = self.gwc(x)
        if self.form in ("masked", "folded"):
            return y + self.pwc(x)
        m = self.in_channels // self.part
        for s, shift in enumerate(self.shifts, start=1):
            y = y + shift(torch.cat([x[:, s * m:], x[:, :s * m]], dim=1))
        return y

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, part={self.part}, form={self.form!r}"


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.contiguous(), requires_grad=False)


def hetconv_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The sparse HetConv layers of a model (after :func:`to_sparse`), by path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseHetConv2d)}


def export_form(model: nn.Module, form: str = "masked", fuse: bool = True) -> nn.Module:
    """A copy of ``model`` for export: every HetConv layer as :class:`ExportHetConv2d` of ``form``.

    The model is first converted to the sparse form (exactly: :func:`~sparse_hetconv.to_sparse`
    reads the masked, published and shifted forms) and its BatchNorms folded
    (:func:`~sparse_hetconv.fuse_bn`, when ``fuse``); the result is in eval mode, channels-last
    parameters made contiguous (exporters record the layout of the weights).

    Args:
        model (nn.Module): a model with HetConv layers in any form, or none (then only fused).
        form (str): one of :data:`FORMS`.
        fuse (bool): fold BatchNorms into the preceding layers first.

    Returns:
        nn.Module: the export model (the source is not changed).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an unknown ``form``, or a 3-D HetConv layer (2-D only).
    """
    check_model(model)
    if form not in FORMS:
        raise ValueError(f"form ({form!r}) must be one of {FORMS}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="to_sparse: the model has no layer to convert")
        work = to_sparse(copy.deepcopy(model).eval(), inplace=True, memory_format=None)
    for name, m in work.named_modules():
        if type(m).__name__ == "SparseHetConv3d":
            raise ValueError(f"module '{name}' is a 3-D HetConv layer; export supports 2-D layers only")
    if fuse:
        work = fuse_bn(work, inplace=True)
    for name, layer in hetconv_layers(work).items():
        parent, _, leaf = name.rpartition(".")
        owner = work.get_submodule(parent) if parent else work
        replacement = ExportHetConv2d(layer, form)
        if name == "":
            return replacement
        setattr(owner, leaf, replacement)
    return work._apply(lambda t: t.contiguous()).eval()
