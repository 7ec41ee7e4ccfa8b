"""Image data sets for the trainer, read without torchvision and never downloaded; the augmentation.

HetConv: Singh et al., CVPR 2019, https://arxiv.org/abs/1903.04120 trains VGG-16 on CIFAR-10 with
random 32x32 crops of the 4-pixel zero-padded image and horizontal flips. Three readers give the same
:class:`ImageData` (uint8 images ``N x C x 32 x 32``, labels, class names, normalisation):

* :func:`load_cifar10`: the ``cifar-10-batches-py`` folder (``data_batch_1`` ... ``data_batch_5``,
  ``test_batch``), read with an unpickler that builds numpy arrays and plain values only, so a
  tampered file cannot run code;
* :func:`load_fashion_mnist`: Fashion-MNIST's four IDX files (gzipped or not), where Debian's
  ``dataset-fashion-mnist`` package installs them (:data:`FASHION_MNIST_DEFAULT`) unless told
  otherwise; the 28x28 grey images are zero-padded to 32x32;
* :func:`load_image_folder`: the user's own images, one sub-folder per class (Pillow, optional).

A missing data set raises ``FileNotFoundError`` with one sentence saying where the files are
expected and how to get them. Augmentation works on whole batches of tensors, on any device.
"""

from __future__ import annotations

import gzip
import io
import pickle
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._checks import MissingExtraError, check_int

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "DATASETS", "FASHION_MNIST_DEFAULT", "ImageData", "augment",
           "find_cifar10", "find_dataset", "find_fashion_mnist", "iterate_batches", "load_cifar10", "load_dataset",
           "load_fashion_mnist", "load_image_folder", "normalize", "read_idx"]

DATASETS = ("cifar10", "fashion_mnist", "folder")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
#: Where Debian's ``dataset-fashion-mnist`` package puts the files (``dpkg -L dataset-fashion-mnist``).
FASHION_MNIST_DEFAULT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                       "t10k-labels-idx1-ubyte")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SIZE = 32  # the input size of the registered VGG

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
class ImageData:
    """An image classification data set in memory.

    Attributes:
        train_images (Tensor[N, C, H, W] uint8), train_labels (Tensor[N] int64),
        test_images (Tensor[M, C, H, W] uint8), test_labels (Tensor[M] int64): the splits.
        root (Path): the folder read.
        classes (tuple of str): class names, by label.
        mean, std (tuple of float): per-channel statistics of the pixels in [0, 1] that
            :func:`normalize` removes (CIFAR-10: the published recipe's; the others: their training set's).
        name (str): one of :data:`DATASETS`.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    root: Path
    classes: tuple[str, ...] = CIFAR10_CLASSES
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    name: str = "cifar10"

    def subset(self, train: int | None = None, test: int | None = None) -> ImageData:
        """The first ``train`` / ``test`` images (None: all) of a fixed class-balanced order: the
        same images whatever the run's seed; classes take turns, so every class gets its share.

        Raises:
            ValueError: a count that is not an int >= 1 or exceeds the split's size.
        """
        splits = {}
        for split, count in (("train", train), ("test", test)):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if count is not None:
                check_int(f"{split}_subset", count)
                if count > len(labels):
                    raise ValueError(f"{split}_subset ({count}) exceeds the {len(labels)} {split} images of "
                                     f"{self.name}")
                index = _balanced_order(labels)[:count]
                images, labels = images[index], labels[index]
            splits[f"{split}_images"], splits[f"{split}_labels"] = images, labels
        return replace(self, **splits)


def _balanced_order(labels: torch.Tensor) -> torch.Tensor:
    """A seeded shuffle reordered so that the classes take turns (round robin over ranks)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    shuffled = labels[order]
    rank = torch.zeros_like(order)
    for label in shuffled.unique():
        where = (shuffled == label).nonzero().squeeze(1)
        rank[where] = torch.arange(len(where))
    return order[torch.argsort(rank * (int(labels.max()) + 1) + shuffled, stable=True)]


def _statistics(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images scaled to [0, 1], from their histograms."""
    counts = torch.stack([torch.bincount(images[:, c].reshape(-1), minlength=256) for c in range(images.shape[1])])
    values, counts = torch.arange(256, dtype=torch.float64) / 255, counts.double()
    mean = (counts * values).sum(1) / counts.sum(1)
    std = ((counts * (values - mean[:, None]) ** 2).sum(1) / (counts.sum(1) - 1)).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


# -- CIFAR-10 -----------------------------------------------------------------------------------------
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


def load_cifar10(data: str | Path) -> ImageData:
    """Read CIFAR-10 from its python-pickle folder (no torchvision, no download).

    Args:
        data (str or Path): the ``cifar-10-batches-py`` folder or the folder that holds it.

    Returns:
        ImageData: uint8 images ``(N, 3, 32, 32)`` and int64 labels, train and test.

    Raises:
        FileNotFoundError: the files are missing (the message says where to put them).
        ValueError: a file is not a CIFAR-10 batch.
    """
    root = find_cifar10(data)
    train = [_read_batch(root / name) for name in TRAIN_FILES]
    test_images, test_labels = _read_batch(root / TEST_FILE)
    return ImageData(
        torch.from_numpy(np.concatenate([images for images, _ in train])),
        torch.from_numpy(np.concatenate([labels for _, labels in train])),
        torch.from_numpy(test_images.copy()),
        torch.from_numpy(test_labels),
        root,
    )


# -- Fashion-MNIST ------------------------------------------------------------------------------------
def _idx_path(root: Path, stem: str) -> Path | None:
    return next((root / name for name in (stem + ".gz", stem) if (root / name).is_file()), None)


def find_fashion_mnist(data: str | Path | None = None) -> Path:
    """The folder holding Fashion-MNIST's four IDX files: ``data`` (default
    :data:`FASHION_MNIST_DEFAULT`), ``data/fashion-mnist`` or torchvision's ``data/FashionMNIST/raw``.

    Raises:
        FileNotFoundError: no such folder holds all four; the message says how to get them.
    """
    data = Path(data) if data is not None else FASHION_MNIST_DEFAULT
    for root in (data, data / "fashion-mnist", data / "FashionMNIST" / "raw"):
        if all(_idx_path(root, stem) for stem in FASHION_MNIST_FILES):
            return root
    missing = [stem + ".gz" for stem in FASHION_MNIST_FILES if not _idx_path(data, stem)]
    raise FileNotFoundError(
        f"Fashion-MNIST not found: {data} lacks {', '.join(missing)}. Nothing is downloaded at run time: on "
        f"Debian or Ubuntu, apt-get install dataset-fashion-mnist puts them in {FASHION_MNIST_DEFAULT} (the "
        "default); elsewhere fetch those four files from https://github.com/zalandoresearch/fashion-mnist (data/"
        f"fashion) into {data}, gzipped or not")


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format; ``.gz`` is decompressed) as a uint8 array.

    Raises:
        ValueError: the file is not such a file, or is truncated (the message names it).
    """
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as file:
            raw = file.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise ValueError(f"{path} is not a readable IDX file ({error or type(error).__name__})") from error
    dims = raw[3] if len(raw) >= 4 else 0
    if len(raw) < 4 + 4 * dims or raw[:3] != b"\x00\x00\x08" or dims == 0:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (it starts with {raw[:4].hex() or 'nothing'}, "
                         "expected 000008 and the number of dimensions)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    size, offset = int(np.prod(shape)), 4 + 4 * dims
    if len(raw) != offset + size:
        raise ValueError(f"{path} is truncated or damaged: its header gives shape {shape} ({size} bytes of data), "
                         f"the file holds {len(raw) - offset}")
    return np.frombuffer(raw, np.uint8, size, offset).reshape(shape)


def load_fashion_mnist(data: str | Path | None = None) -> ImageData:
    """Read Fashion-MNIST from its IDX files (no torchvision, no download).

    The 28x28 grey images are zero-padded to 32x32 (their background is black), the input size of
    the registered VGG; :func:`normalize` repeats the grey channel into the model's three.

    Args:
        data (str or Path, optional): the folder of the four files (see :func:`find_fashion_mnist`);
            default :data:`FASHION_MNIST_DEFAULT`, where ``apt-get install dataset-fashion-mnist`` puts them.

    Returns:
        ImageData: 60000 training and 10000 test images ``(N, 1, 32, 32)`` uint8, labels 0..9.

    Raises:
        FileNotFoundError: the files are missing (the message says how to get them).
        ValueError: a file is truncated or not an IDX file, or images and labels do not match.
    """
    root = find_fashion_mnist(data)
    arrays = [read_idx(_idx_path(root, stem)) for stem in FASHION_MNIST_FILES]
    splits = []
    for images, labels, stem in ((arrays[0], arrays[1], FASHION_MNIST_FILES[0]),
                                 (arrays[2], arrays[3], FASHION_MNIST_FILES[2])):
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1] or labels.max() > 9:
            raise ValueError(f"{root / stem}: expected N 28x28 images and N labels in 0..9, got images "
                             f"{images.shape} and labels {labels.shape}")
        pad = (SIZE - 28) // 2
        splits += [F.pad(torch.from_numpy(images.copy())[:, None], (pad,) * 4),
                   torch.from_numpy(labels.astype(np.int64))]
    mean, std = _statistics(splits[0])
    return ImageData(*splits, root, FASHION_MNIST_CLASSES, mean, std, "fashion_mnist")


# -- an image folder ----------------------------------------------------------------------------------
def _folder_layout(data: str | Path) -> tuple[Path, Path | None, tuple[str, ...]]:
    """(train folder, test folder or None, class names) of an image folder."""
    root = Path(data)
    train = root / "train" if (root / "train").is_dir() else root
    test = next((root / name for name in ("test", "val") if (root / name).is_dir()), None) if train != root else None
    classes = tuple(sorted(p.name for p in train.iterdir() if p.is_dir())) if train.is_dir() else ()
    if len(classes) < 2:
        raise FileNotFoundError(
            f"image folder not found: {root} must hold one sub-folder of images per class (at least two), or train/ "
            "and test/ (or val/) folders that do; images are yours to put there, nothing is downloaded")
    if train != root and test is None:
        raise FileNotFoundError(f"image folder {root} has train/ but no test/ (or val/) folder beside it")
    if test is not None and (missing := sorted(set(p.name for p in test.iterdir() if p.is_dir()) - set(classes))):
        raise ValueError(f"{test} has classes that {train} lacks: {', '.join(missing)}")
    return train, test, classes


def _read_images(files: list[Path], size: int) -> torch.Tensor:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as error:
        raise MissingExtraError("reading an image folder needs Pillow: pip install pillow (or "
                                "'sparse_hetconv[deploy]')") from error
    arrays = []
    for path in files:
        try:
            with Image.open(path) as image:
                arrays.append(np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR)))
        except (UnidentifiedImageError, OSError, ValueError) as error:
            reason = " ".join(str(error).split()) or type(error).__name__
            raise ValueError(f"{path} is not a readable image ({reason})") from error
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_image_folder(data: str | Path, size: int = SIZE) -> ImageData:
    """Read the user's images: ``data/<class>/*.png`` (every 5th image of a class, in name order,
    is held out for testing) or ``data/train/<class>/`` and ``data/test/<class>/`` (or ``val/``).

    Images (png, jpg, bmp, gif, webp, tif) are converted to RGB and resized to ``size x size``
    with Pillow; classes are the sub-folders, in sorted order; normalisation uses the training
    images' statistics.

    Raises:
        FileNotFoundError: no class folders (the message says what layout is expected).
        ValueError: a class without images, or a file that is not a readable image.
        MissingExtraError: Pillow is not installed.
    """
    check_int("size", size)
    train, test, classes = _folder_layout(data)
    splits = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(classes):
        for split, folder in (("train", train), ("test", test)):
            if folder is None or not (folder / name).is_dir():
                continue
            files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files and split == "train":
                raise ValueError(f"{folder / name} holds no image ({', '.join(IMAGE_SUFFIXES)})")
            if test is None:
                splits["test"][0].extend(files[4::5])
                splits["test"][1].extend([label] * len(files[4::5]))
                files = [f for i, f in enumerate(files) if i % 5 != 4]
            splits[split][0].extend(files)
            splits[split][1].extend([label] * len(files))
    tensors = [t for files, labels in splits.values()
               for t in (_read_images(files, size) if files else torch.zeros(0, 3, size, size, dtype=torch.uint8),
                         torch.tensor(labels, dtype=torch.int64))]
    mean, std = _statistics(tensors[0])
    return ImageData(*tensors, Path(data), classes, mean, std, "folder")


def find_dataset(name: str, data: str | Path | None = None) -> tuple[Path, tuple[str, ...]]:
    """Where data set ``name`` is and its class names, without reading the images.

    Raises:
        ValueError: ``name`` is not one of :data:`DATASETS`, or ``data`` is missing for ``"folder"``.
        FileNotFoundError: the data set is not there (the message says how to get it).
    """
    if name not in DATASETS:
        raise ValueError(f"dataset ({name!r}) must be one of {DATASETS}")
    if name == "cifar10":
        return find_cifar10("data" if data is None else data), CIFAR10_CLASSES
    if name == "fashion_mnist":
        return find_fashion_mnist(data), FASHION_MNIST_CLASSES
    if data is None:
        raise ValueError("data (None) must be the image folder for dataset 'folder'")
    return Path(data), _folder_layout(data)[2]


def load_dataset(name: str, data: str | Path | None = None) -> ImageData:
    """Read data set ``name`` (one of :data:`DATASETS`) from ``data`` (default: ``"data"`` for
    CIFAR-10, :data:`FASHION_MNIST_DEFAULT` for Fashion-MNIST; required for ``"folder"``)."""
    root, _ = find_dataset(name, data)
    return {"cifar10": load_cifar10, "fashion_mnist": load_fashion_mnist, "folder": load_image_folder}[name](root)


# -- batches ------------------------------------------------------------------------------------------
def normalize(images: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD, channels: int = 3) -> torch.Tensor:
    """uint8 (or [0, 1] float) images ``Tensor[B, C, H, W]`` -> float32 ``(x - mean) / std``.

    ``mean`` and ``std`` are per channel (default CIFAR-10's); grey images (``C = 1``) are repeated
    into ``channels`` channels, the registered models taking RGB.
    """
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    x = (x - mean) / std
    return x.expand(-1, channels, -1, -1).contiguous() if x.shape[1] == 1 and channels != 1 else x


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


