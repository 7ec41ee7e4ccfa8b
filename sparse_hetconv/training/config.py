"""The settings of a training run (:class:`TrainConfig`): the published recipe by default, checked before any work.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120 (Table 1, VGG-16 on CIFAR-10).
"""

from __future__ import annotations

import errno
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .._checks import check_bool, check_int
from ..models import list_models
from ..models.layers import FORMS
from .data import DATASETS

__all__ = ["RECIPE", "TrainConfig"]

# Settings that define a run: a resumed run must use the same ones.
RECIPE = ("model", "part", "form", "seed", "batch_size", "lr", "momentum", "weight_decay", "milestones",
          "gamma", "crop_padding", "flip", "dataset", "train_subset", "test_subset")
# Recipe settings added in 0.3, and what checkpoints written before them trained with.
_ADDED = {"dataset": "cifar10", "train_subset": None, "test_subset": None}

@dataclass
class TrainConfig:
    """Settings of :func:`train`; the defaults are the published recipe.

    Attributes:
        dataset (str): ``"cifar10"`` (default), ``"fashion_mnist"`` or ``"folder"`` (one
            sub-folder of images per class); see :mod:`sparse_hetconv.training.data`.
        data (str or None): where the data set is: CIFAR-10's ``cifar-10-batches-py`` folder or
            its parent (default ``"data"``), Fashion-MNIST's IDX files (default where Debian's
            ``dataset-fashion-mnist`` puts them), the image folder (required).
        train_subset, test_subset (int or None): train / test on this many images of a fixed
            class-balanced selection (:meth:`ImageData.subset`; None: all).
        model (str): a registered model (default ``"vgg16_cifar"``).
        part (int): HetConv ``P`` (default 4).
        form (str): ``"sparse"`` (default) or ``"masked"`` (the published layout).
        epochs (int): total epochs (330).
        batch_size (int): 128.
        lr, momentum, weight_decay (float): SGD's 0.1, 0.9, 5e-4.
        milestones (tuple of int): MultiStepLR epochs (50, 140, 210, 240, 270, 300).
        gamma (float): MultiStepLR factor (0.2).
        crop_padding (int): padding of the random crop (4; 0 turns cropping off).
        flip (bool): random horizontal flips (True).
        device (str or None): ``"cuda"`` when available, else ``"cpu"``, by default.
        seed (int or None): 0 by default; None draws one (recorded in the checkpoints).
        out_dir (str): where ``last.pt``, ``best.pt`` and ``model_sparse.pt`` go. A folder that
            holds them already is refused unless ``resume`` is a checkpoint in that folder (the
            run continues there) or ``force`` is given.
        checkpoint_every (int): save ``last.pt`` every this many epochs (and after the last one).
        resume (str or None): a ``last.pt``/``best.pt`` to continue from (same recipe required).
        eval_only (bool): only evaluate ``weights`` (or ``resume``) on the test set.
        weights (str or None): a model checkpoint for ``eval_only`` (any layout
            :func:`sparse_hetconv.checkpoint.state_dict_of` accepts; model, form and part are
            read from the file).
        eval_batch_size (int): batch size of evaluation (500).
        progress (bool): tqdm progress bars (True).
        force (bool): train into an ``out_dir`` that holds another run; its ``last.pt``,
            ``best.pt`` and ``model_sparse.pt`` are removed when training starts, so that the
            folder never mixes two runs (False).
    """

    data: str | None = None
    dataset: str = "cifar10"
    train_subset: int | None = None
    test_subset: int | None = None
    model: str = "vgg16_cifar"
    part: int = 4
    form: str = "sparse"
    epochs: int = 330
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = (50, 140, 210, 240, 270, 300)
    gamma: float = 0.2
    crop_padding: int = 4
    flip: bool = True
    device: str | None = None
    seed: int | None = 0
    out_dir: str = "runs/hetconv"
    checkpoint_every: int = 10
    resume: str | None = None
    eval_only: bool = False
    weights: str | None = None
    eval_batch_size: int = 500
    progress: bool = True
    force: bool = False

    def validate(self) -> None:
        """Check every setting; raises ``TypeError`` / ``ValueError`` naming the setting
        (``FileNotFoundError`` / ``IsADirectoryError`` for a ``resume`` or ``weights`` that is not
        a file)."""
        if not isinstance(self.out_dir, (str, os.PathLike)):
            raise TypeError(f"out_dir must be a path (str or os.PathLike), got {type(self.out_dir).__name__}")
        for name in ("data", "resume", "weights"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), (str, os.PathLike)):
                raise TypeError(f"{name} must be a path (str or os.PathLike) or None, got "
                                f"{type(getattr(self, name)).__name__}")
        if self.device is not None and not isinstance(self.device, (str, torch.device)):
            raise TypeError(f"device must be a str, a torch.device or None, got {type(self.device).__name__}")
        if not isinstance(self.model, str) or self.model not in list_models():
            raise ValueError(f"model ({self.model!r}) is not registered; available: {', '.join(list_models())}")
        if self.form not in FORMS:
            raise ValueError(f"form ({self.form!r}) must be one of {FORMS}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset ({self.dataset!r}) must be one of {DATASETS}")
        if self.dataset == "folder" and self.data is None:
            raise ValueError("data (None) must be the image folder for dataset 'folder'")
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name))
        for name in ("part", "epochs", "batch_size", "checkpoint_every", "eval_batch_size"):
            check_int(name, getattr(self, name))
        check_int("crop_padding", self.crop_padding, 0)
        if self.seed is not None:
            check_int("seed", self.seed, 0)
        for name in ("lr", "momentum", "weight_decay", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} ({value!r}) must be a finite number >= 0")
        if self.lr == 0:
            raise ValueError("lr (0) must be > 0")
        if not isinstance(self.milestones, (list, tuple)):
            raise TypeError(f"milestones must be a list or tuple of epochs, got {type(self.milestones).__name__} "
                            f"({self.milestones!r})")
        self.milestones = tuple(self.milestones)
        for value in self.milestones:
            check_int("milestones", value)
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError(f"milestones ({self.milestones}) must be increasing epochs")
        for name in ("flip", "eval_only", "progress", "force"):
            check_bool(name, getattr(self, name))
        if self.eval_only and not (self.weights or self.resume):
            raise ValueError("eval_only needs weights (or resume): the checkpoint to evaluate")
        for name in ("resume", "weights"):
            path = getattr(self, name)
            if path is not None and Path(path).is_dir():
                raise IsADirectoryError(errno.EISDIR, f"{name} is a folder, expected a checkpoint file", str(path))
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(errno.ENOENT, f"{name} does not exist", str(path))
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError) as error:
                raise ValueError(f"device ({self.device!r}) is not a torch device: {error}") from error
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device ({self.device!r}) is not available: torch.cuda.is_available() is False")
