"""Calibration and test data for quantization, with nothing downloaded.

``"digits"`` is scikit-learn's handwritten digits (1797 8 x 8 grey images of 0-9, shipped inside the
package), scaled to [0, 1], repeated over the channels and upsampled bilinearly to the model's
input size: a real image data set that runs on a fresh machine. A folder holds ``.npy`` / ``.pt``
arrays (``N x C x H x W`` or ``C x H x W``) or images (``.png``, ``.jpg``, read with Pillow).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import MissingExtraError

__all__ = ["calibration_batches", "digits"]
_IMAGES = (".png", ".jpg", ".jpeg", ".bmp")
_ARRAYS = (".npy", ".pt")


def _check_size(input_size) -> tuple[int, int, int]:
    if (not isinstance(input_size, (tuple, list)) or len(input_size) != 3
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in input_size)):
        raise ValueError(f"input_size ({input_size!r}) must be three ints >= 1: channels, height, width")
    return tuple(input_size)


def digits(input_size=(3, 32, 32), split: str = "all", seed: int = 0) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as ``(images, labels)``, images ``Tensor[n, C, H, W]`` normalised to zero
    mean and unit variance.

    Args:
        input_size (tuple): ``(C, H, W)`` of the model's input.
        split (str): ``"all"`` (1797), or a fixed shuffled ``"train"`` (1437) / ``"test"`` (360) split.
        seed (int): the shuffle of the split.

    Raises:
        ValueError: a bad ``input_size`` or ``split``.
        ImportError: scikit-learn is not installed (``pip install 'sparse_hetconv[deploy]'``).
    """
    channels, height, width = _check_size(input_size)
    if split not in ("all", "train", "test"):
        raise ValueError(f"split ({split!r}) must be 'all', 'train' or 'test'")
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise MissingExtraError("the digits data set needs scikit-learn: pip install 'sparse_hetconv[deploy]'") from error
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(data.target, dtype=torch.int64)
    images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    # Zero mean and unit variance over the whole set (its own statistics, so any size works).
    images = ((images - images.mean()) / images.std()).expand(-1, channels, -1, -1).contiguous()
    if split != "all":
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        cut = int(0.8 * len(labels))
        index = order[:cut] if split == "train" else order[cut:]
        images, labels = images[index], labels[index]
    return images, labels


def _load_folder(folder: Path, input_size) -> Tensor:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGES + _ARRAYS)
    if not files:
        raise ValueError(f"calibration folder {folder} holds no {', '.join(_ARRAYS + _IMAGES)} file")
    tensors = []
    for path in files:
        try:
            t = _load_file(path, input_size)
        except Exception as error:  # numpy, torch and Pillow raise many types for a damaged or foreign file
            if isinstance(error, (OSError, ValueError)) and str(path) in str(error):
                raise  # it names the file already (the file system's errors, read_checkpoint's)
            reason = " ".join(str(error).split(". ")[0].split()) or type(error).__name__
            if "allow_pickle" in str(error):
                reason = "it holds pickled Python objects, which are never loaded"
            raise ValueError(f"calibration file {path} cannot be read: {reason}") from error
        tensors.append(t if t.dim() == 4 else t[None])
    return torch.cat([_fit(t, str(f)) for t, f in zip(tensors, files)]) if len(tensors) > 1 else tensors[0]


def _load_file(path: Path, input_size) -> Tensor:
    import numpy as np

    if path.suffix.lower() == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False)).float()
    if path.suffix.lower() == ".pt":
        from ..checkpoint import read_checkpoint

        t = read_checkpoint(path)
        if not isinstance(t, Tensor):
            raise ValueError(f"{path}: expected a tensor, got {type(t).__name__}")
        return t.float()
    from PIL import Image

    with Image.open(path) as image:
        mode = "L" if input_size[0] == 1 else "RGB"
        array = np.asarray(image.convert(mode).resize((input_size[2], input_size[1])), dtype=np.float32)
    t = torch.from_numpy(array / 255.0)
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1)


def _fit(t: Tensor, what: str) -> Tensor:
    if t.dim() != 4:
        raise ValueError(f"{what}: expected images of shape (N, C, H, W) or (C, H, W), got {tuple(t.shape)}")
    return t


def calibration_batches(source, input_size, batch: int = 32, count: int = 256) -> list[Tensor]:
    """Calibration inputs for a model of ``input_size``, in batches.

    Args:
        source: ``"digits"``, a folder (``str`` or ``Path``) of arrays or images, a tensor
            ``(N, C, H, W)``, or an iterable of such tensors.
        input_size (tuple): ``(C, H, W)`` the model takes.
        batch (int): images per batch. count (int): at most this many images in all.

    Returns:
        list of Tensor[batch, C, H, W] (float32; the last batch may be smaller).

    Raises:
        ValueError: no images, images of another shape than ``input_size`` (the message names both),
            a bad ``batch`` or ``count``.
        FileNotFoundError: a folder that does not exist.
        TypeError: a source of another type.
    """
    size = _check_size(input_size)
    for name, value in (("batch", batch), ("count", count)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} ({value!r}) must be an int >= 1")
    if isinstance(source, str) and source == "digits":
        images = digits(size)[0]
    elif isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.exists():
            raise FileNotFoundError(2, "no such calibration folder (or use the name 'digits')", str(folder))
        if not folder.is_dir():
            raise ValueError(f"calibration source {folder} is a file; expected a folder of arrays or images, "
                             "or 'digits'")
        images = _load_folder(folder, size)
    elif isinstance(source, Tensor):
        images = source
    elif isinstance(source, Iterable):
        parts = [t for t in source]
        if not parts or not all(isinstance(t, Tensor) for t in parts):
            raise TypeError("calibration must be 'digits', a folder, a tensor or an iterable of tensors")
        images = torch.cat([t if t.dim() == 4 else t[None] for t in parts])
    else:
        raise TypeError(f"calibration must be 'digits', a folder, a tensor or an iterable of tensors, "
                        f"got {type(source).__name__}")
    if images.dim() == 3:
        images = images[None]
    if images.numel() == 0 or images.shape[0] == 0:
        raise ValueError("calibration data is empty: quantization needs at least one input")
    if tuple(images.shape[1:]) != size:
        raise ValueError(f"calibration images have shape {tuple(images.shape[1:])}, expected the model's input "
                         f"size {size}")
    images = images[:count].float()
    return list(images.split(batch))
