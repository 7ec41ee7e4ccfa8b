"""Training HetConv models on image data sets: data (no torchvision, no download) and the trainer (opt-in import).

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120 (Table 1, VGG-16 on CIFAR-10).
``import sparse_hetconv`` does not import this package.

* :mod:`.data`: :class:`ImageData` and its readers: :func:`load_cifar10` (the
  ``cifar-10-batches-py`` folder, with a restricted unpickler), :func:`load_fashion_mnist` (the IDX
  files, where Debian's ``dataset-fashion-mnist`` puts them), :func:`load_image_folder` (one
  sub-folder per class), :func:`load_dataset` by name; :func:`augment` and :func:`normalize`
  apply the recipe's augmentation to batches.
* :mod:`.config`: :class:`TrainConfig`, the settings (the published recipe by default).
* :mod:`.trainer`: :func:`train` (checkpoints, resume, evaluation-only), :func:`train_epoch` (one
  epoch, for loops of one's own), :func:`evaluate`, :class:`TrainResult`.
"""

from .data import (DATASETS, FASHION_MNIST_DEFAULT, ImageData, augment, find_cifar10, find_dataset,
                   find_fashion_mnist, iterate_batches, load_cifar10, load_dataset, load_fashion_mnist,
                   load_image_folder, normalize, read_idx)
from .config import TrainConfig
from .trainer import TrainResult, config_from_checkpoint, evaluate, train, train_epoch

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DEFAULT",
    "ImageData",
    "TrainConfig",
    "TrainResult",
    "augment",
    "config_from_checkpoint",
    "evaluate",
    "find_cifar10",
    "find_dataset",
    "find_fashion_mnist",
    "iterate_batches",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "load_image_folder",
    "normalize",
    "read_idx",
    "train",
    "train_epoch",
]

