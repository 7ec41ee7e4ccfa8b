"""The published CIFAR-10 experiment: data (no torchvision, no download) and training (opt-in import).

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120 (Table 1, VGG-16 on CIFAR-10).
``import sparse_hetconv`` does not import this package.

* :mod:`.data`: :func:`load_cifar10` reads the ``cifar-10-batches-py`` folder with a restricted
  unpickler; :func:`augment` and :func:`normalize` apply the recipe's augmentation to batches.
* :mod:`.train`: :class:`TrainConfig` (the published recipe), :func:`train_cifar` (checkpoints,
  resume, evaluation-only), :class:`TrainResult`.
"""

from .data import Cifar10, augment, find_cifar10, iterate_batches, load_cifar10, normalize
from .train import TrainConfig, TrainResult, config_from_checkpoint, evaluate, train_cifar

__all__ = [
    "Cifar10",
    "TrainConfig",
    "TrainResult",
    "augment",
    "config_from_checkpoint",
    "evaluate",
    "find_cifar10",
    "iterate_batches",
    "load_cifar10",
    "normalize",
    "train_cifar",
]
