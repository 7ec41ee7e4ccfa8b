"""Tiny data sets in the real on-disk formats the trainer reads, written by the tests (nothing is downloaded).

* :func:`write_cifar10`: ``cifar-10-batches-py``, python pickles of uint8 rows and label lists;
* :func:`write_fashion_mnist`: the four IDX files (big-endian header, uint8 data), gzipped or not;
* :func:`write_image_folder`: PNG files, one sub-folder per class.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

TRAIN_PER_BATCH, TEST_IMAGES = 8, 24  # CIFAR-10: 5 x 8 + 24 = 64 images
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")


def write_cifar10(root: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write ``root/cifar-10-batches-py`` as CIFAR-10's python version does; return what was written."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name, count in [(f"data_batch_{i}", TRAIN_PER_BATCH) for i in range(1, 6)] + [("test_batch", TEST_IMAGES)]:
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, count)]
        entry = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{i}.png".encode() for i in range(count)]}
        with open(folder / name, "wb") as file:
            pickle.dump(entry, file, protocol=2)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)], b"num_vis": 3072}, file, protocol=2)
    return written


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8) in the IDX format: 0, 0, type 0x08 (unsigned byte), the number of
    dimensions, each dimension as a big-endian 32-bit int, then the data in C order."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_fashion_mnist(folder: Path, train: int = 40, test: int = 24, gz: bool = True, seed: int = 0) -> dict:
    """Fashion-MNIST's four files with random 28x28 images; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for stem, count in zip(FASHION_FILES, (train, train, test, test)):
        arrays[stem] = (rng.integers(0, 256, (count, 28, 28), dtype=np.uint8) if "images" in stem
                        else rng.integers(0, 10, count, dtype=np.uint8))
        data = idx_bytes(arrays[stem])
        (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(data) if gz else data)
    return arrays


def write_image_folder(root: Path, classes=("cat", "dog", "emu"), per_class: int = 6, size=(20, 12),
                       seed: int = 0) -> dict[str, list[np.ndarray]]:
    """``root/<class>/<i>.png`` RGB images of ``size`` (width, height); returns the pixels by class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    written = {}
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        written[name] = []
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
            written[name].append(pixels)
    return written
