"""sparse_hetconv: HetConv (heterogeneous kernel-based convolution) layers for PyTorch.

HetConv: Singh et al., "HetConv: Heterogeneous Kernel-Based Convolutions for Deep CNNs",
CVPR 2019, https://arxiv.org/abs/1903.04120.

Three forms of one layer: the definition (tests only), the published masked dense form
(:class:`MaskedHetConv2d`) and the sparse form (:class:`SparseHetConv2d`), which stores only the
kernels that exist. :func:`to_sparse` / :func:`to_masked` convert whole models exactly;
:func:`from_shifted` / :func:`to_shifted` handle the paper's shifted pattern (docs/conversion.md);
any other HetConv code converts by probing (``to_sparse(model, probe=[MyHetConv])``, :class:`Probe`);
:func:`hetconvify` turns standard CNNs into HetConv ones; :func:`count_macs` counts the paper's
way. This import loads the layers and their tools only; the measuring tools
(:mod:`sparse_hetconv.profiling`), the trainer and its data sets (:mod:`sparse_hetconv.training`), the
spconv layers (:mod:`sparse_hetconv.submanifold`) and the command line
(:mod:`sparse_hetconv.cli`) are imported when asked for.
"""

from . import _flop_formulas, autotune, backends, functional, models, ops
from .checkpoint import CheckpointReport, convert_checkpoint
from .convert import ConversionReport, hetconvify, to_masked, to_sparse
from .counting import LayerCount, ModelCounts, count_macs, count_model, count_params
from .functional import het_conv2d, het_conv3d
from .batchnorm import fuse_bn
from .masked import MaskedHetConv2d, MaskedHetConv3d
from .pattern import HetConvPattern, shifted_to_block_permutation
from .permutation import ChannelPermutation
from .probing import Probe
from .shifted import from_shifted, shifted_mask, to_shifted
from .sparse import SparseHetConv2d, SparseHetConv3d

__version__ = "0.4.0"

__all__ = [
    "ChannelPermutation",
    "ConversionReport",
    "CheckpointReport",
    "HetConvPattern",
    "LayerCount",
    "MaskedHetConv2d",
    "MaskedHetConv3d",
    "ModelCounts",
    "Probe",
    "SparseHetConv2d",
    "SparseHetConv3d",
    "autotune",
    "backends",
    "convert_checkpoint",
    "count_macs",
    "count_model",
    "count_params",
    "functional",
    "from_shifted",
    "fuse_bn",
    "het_conv2d",
    "het_conv3d",
    "hetconvify",
    "models",
    "ops",
    "shifted_mask",
    "shifted_to_block_permutation",
    "to_masked",
    "to_shifted",
    "to_sparse",
]

_OPT_IN = ("cli", "flop_tools", "profiling", "submanifold", "training")
_flop_formulas.register_when_imported()


def __getattr__(name: str):
    # The opt-in subpackages load on first attribute access (``sparse_hetconv.profiling.x``), as
    # ``import sparse_hetconv.profiling`` would.
    if name in _OPT_IN:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
