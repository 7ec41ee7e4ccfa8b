"""sparse_hetconv: HetConv (heterogeneous kernel-based convolution) layers for PyTorch.

HetConv: Singh et al., "HetConv: Heterogeneous Kernel-Based Convolutions for Deep CNNs",
CVPR 2019, https://arxiv.org/abs/1903.04120.

Three forms of one layer: the definition (tests only), the published masked dense form
(:class:`MaskedHetConv2d`) and the sparse form (:class:`SparseHetConv2d`), which stores only the
kernels that exist. :func:`to_sparse` / :func:`to_masked` convert whole models exactly;
:func:`hetconvify` turns standard CNNs into HetConv ones.
"""

from . import autotune, functional, integrations, models, profiling
from .checkpoint import convert_checkpoint
from .convert import HetConvifyReport, hetconvify, to_masked, to_sparse
from .counting import count_macs, count_model, count_params
from .fuse import fuse_bn
from .masked import MaskedHetConv2d, MaskedHetConv3d
from .pattern import HetConvPattern, shifted_to_block_permutation
from .sparse import SparseHetConv2d, SparseHetConv3d
from .train import TrainConfig, train_cifar

__version__ = "0.1.0"

__all__ = [
    "HetConvPattern",
    "HetConvifyReport",
    "MaskedHetConv2d",
    "MaskedHetConv3d",
    "SparseHetConv2d",
    "SparseHetConv3d",
    "TrainConfig",
    "autotune",
    "convert_checkpoint",
    "count_macs",
    "count_model",
    "count_params",
    "functional",
    "fuse_bn",
    "hetconvify",
    "integrations",
    "models",
    "profiling",
    "shifted_to_block_permutation",
    "to_masked",
    "to_sparse",
    "train_cifar",
]
