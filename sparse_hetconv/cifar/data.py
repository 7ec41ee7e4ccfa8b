"""CIFAR-10 from its python-pickle folder, and the augmentation of the published recipe.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120 trains VGG-16 on CIFAR-10 with
random 32x32 crops of the 4-pixel zero-padded image and horizontal flips. This module reads the
standard ``cifar-10-batches-py`` folder (``data_batch_1`` ... ``data_batch_5``, ``test_batch``)
without torchvision and applies that augmentation to whole batches of tensors, on any device.
Nothing is downloaded: a missing folder raises an error that says where to put the files.

The batch files are Python pickles. They are read with an unpickler that builds numpy arrays,
lists, strings and numbers only and refuses every other class, so a tampered file cannot run code.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "Cifar10", "load_cifar10", "find_cifar10", "augment", "normalize",
           "iterate_batches"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

# (module, name) pairs a CIFAR-10 batch pickle may reference: numpy's array reconstruction, in the
# module paths of numpy 1.x (which wrote the official files) and numpy 2.x, and the bytes
# constructor Python 3 uses for protocol-2 pickles.
_ALLOWED = {
    (core, name)
    for core in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")
    for name in ("_reconstruct", "scalar", "_frombuffer")
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds arrays only")
        return super().find_class(module, name)


@dataclass
class Cifar10:
    """CIFAR-10 in memory.

    Attributes:
        train_images (Tensor[50000, 3, 32, 32] uint8), train_labels (Tensor[50000] int64),
        test_images (Tensor[10000, 3, 32, 32] uint8), test_labels (Tensor[10000] int64): the
        sizes of the full data set; a smaller folder in the same format gives smaller tensors.
        root (Path): the ``cifar-10-batches-py`` folder read.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    root: Path


def find_cifar10(data: str | Path) -> Path:
    """The ``cifar-10-batches-py`` folder: ``data`` itself or ``data/cifar-10-batches-py``.

    Raises:
        FileNotFoundError: neither holds all six batch files; the message says where to put them.
    """
    data = Path(data)
    for root in (data, data / FOLDER):
        if all((root / name).is_file() for name in TRAIN_FILES + (TEST_FILE,)):
            return root
    root = data if data.name == FOLDER else data / FOLDER
    missing = [name for name in TRAIN_FILES + (TEST_FILE,) if not (root / name).is_file()]
    raise FileNotFoundError(
        f"CIFAR-10 not found: {root} lacks {', '.join(missing)}. Nothing is downloaded at run time: "
        f"fetch {_URL} yourself and unpack it into {data} (tar xzf cifar-10-python.tar.gz -C {data}), "
        f"so that {root / TRAIN_FILES[0]} exists"
    )


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as file:
            entry = _ArrayUnpickler(io.BytesIO(file.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise ValueError(f"{path} is not a CIFAR-10 batch file (python pickle): {error}") from error
    if not isinstance(entry, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch file: expected a dict, got {type(entry).__name__}")
    entry = {key.decode() if isinstance(key, bytes) else key: value for key, value in entry.items()}
    if "data" not in entry or "labels" not in entry:
        raise ValueError(f"{path} is not a CIFAR-10 batch file: keys {sorted(map(str, entry))}, "
                         "expected 'data' and 'labels'")
    images = np.asarray(entry["data"])
    try:
        labels = np.asarray(entry["labels"], dtype=np.int64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: 'labels' must be a list of ints in 0..9 ({error})") from error
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {images.dtype} "
                         f"{images.shape}")
    if labels.shape != (images.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(f"{path}: 'labels' must be {images.shape[0]} ints in 0..9, got shape {labels.shape}")
    return images.reshape(-1, 3, 32, 32), labels


def load_cifar10(data: str | Path) -> Cifar10:
    """Read CIFAR-10 from its python-pickle folder (no torchvision, no download).

    Args:
        data (str or Path): the ``cifar-10-batches-py`` folder or the folder that holds it.

    Returns:
        Cifar10: uint8 images ``(N, 3, 32, 32)`` and int64 labels, train and test.

    Raises:
        FileNotFoundError: the files are missing (the message says where to put them).
        ValueError: a file is not a CIFAR-10 batch.
    """
    root = find_cifar10(data)
    train = [_read_batch(root / name) for name in TRAIN_FILES]
    test_images, test_labels = _read_batch(root / TEST_FILE)
    return Cifar10(
        torch.from_numpy(np.concatenate([images for images, _ in train])),
        torch.from_numpy(np.concatenate([labels for _, labels in train])),
        torch.from_numpy(test_images.copy()),
        torch.from_numpy(test_labels),
        root,
    )


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or [0, 1] float) images ``Tensor[B, 3, H, W]`` -> float32 with CIFAR-10's mean and std."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(CIFAR10_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop of the zero-padded image and random horizontal flip, per image.

    The same as torchvision's ``RandomCrop(32, padding)`` and ``RandomHorizontalFlip()`` applied to
    each image before normalisation (the padding is black), but on a whole batch at once.

    Args:
        images (Tensor[B, C, H, W]): uint8 or float images, on any device.
        generator (torch.Generator): a CPU generator; the crops and flips are drawn from it.
        padding (int): zero padding on every side before the crop (0: no crop).
        flip (bool): flip each image horizontally with probability 1/2.

    Returns:
        Tensor[B, C, H, W]: a new tensor of the input's dtype and device.
    """
    batch, _, height, width = images.shape
    out = images
    if padding:
        padded = F.pad(images, (padding,) * 4)
        top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(images.device)
        left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(images.device)
        rows = (top[:, None] + torch.arange(height, device=images.device))[:, None, :, None]
        cols = (left[:, None] + torch.arange(width, device=images.device))[:, None, None, :]
        index = torch.arange(batch, device=images.device)[:, None, None, None]
        channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        out = padded[index, channel, rows, cols]
    if flip:
        mirror = (torch.rand(batch, generator=generator) < 0.5).to(images.device)
        out = torch.where(mirror[:, None, None, None], out.flip(-1), out)
    return out


def iterate_batches(count: int, batch_size: int, generator: torch.Generator | None = None):
    """Index tensors of consecutive batches over ``range(count)``, shuffled when ``generator`` is given.

    A last batch of a single example is dropped (BatchNorm cannot train on one value per channel).
    """
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    for start in range(0, count, batch_size):
        index = order[start:start + batch_size]
        if len(index) == 1 and generator is not None and count > 1:
            return
        yield index
