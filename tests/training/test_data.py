"""Tests for the data set readers and the augmentation (sparse_hetconv.training.data).

Tiny data sets in the real on-disk formats are written by the tests (``writers.py``): CIFAR-10's
pickles, Fashion-MNIST's IDX files, PNG folders. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import pytest

np = pytest.importorskip("numpy", reason="the data set readers build numpy arrays")
import torch  # noqa: E402

from sparse_hetconv.training import data as D  # noqa: E402
from sparse_hetconv.training.data import augment, find_cifar10, load_cifar10  # noqa: E402
from writers import TEST_IMAGES, idx_bytes, write_cifar10, write_fashion_mnist, write_image_folder  # noqa: E402


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    return root, write_cifar10(root)


def test_load_cifar10_reads_the_pickles(cifar):
    root, written = cifar
    data = load_cifar10(root)
    assert data.train_images.shape == (40, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (TEST_IMAGES, 3, 32, 32)
    first, labels = written["data_batch_1"]
    # CIFAR-10 rows are 1024 red, then 1024 green, then 1024 blue values, row-major within a plane
    assert data.train_images[3, 1, 2, 5] == first[3, 1024 + 2 * 32 + 5]
    assert data.train_labels[:8].tolist() == labels
    assert data.test_labels.tolist() == written["test_batch"][1]
    assert find_cifar10(root / "cifar-10-batches-py") == find_cifar10(root), "the folder itself works too"


def test_missing_data_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lacks data_batch_1.*cifar-10-python\.tar\.gz.*tar xzf"):
        load_cifar10(tmp_path)


def test_refuses_a_pickle_with_code(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as file:
        pickle.dump({b"data": Path("x"), b"labels": []}, file)  # any class but numpy's arrays
    with pytest.raises(ValueError, match=r"data_batch_2 is not a CIFAR-10 batch file.*refusing to load pathlib"):
        load_cifar10(tmp_path)


def test_rejects_wrong_shapes(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as file:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, file, protocol=2)
    with pytest.raises(ValueError, match=r"'data' must be a uint8 array of shape \(N, 3072\)"):
        load_cifar10(tmp_path)


def test_augment_crops_and_flips():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(augment(images, generator, padding=0, flip=False), images)
    out = augment(images, generator, padding=4, flip=True)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(16):
        windows = [padded[i, :, t:t + 32, l:l + 32] for t in range(9) for l in range(9)]
        found = any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
        assert found, f"image {i} is not a (flipped) 32x32 window of the padded image"
    again = augment(images, torch.Generator().manual_seed(0), padding=0, flip=True)
    flipped = [not torch.equal(again[i], images[i]) for i in range(16)]
    assert 0 < sum(flipped) < 16, "flips happen to some images, not all"



# -- Fashion-MNIST ------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_fashion_mnist_reads_the_idx_files(tmp_path, gz):
    written = write_fashion_mnist(tmp_path / "fm", train=30, test=12, gz=gz)
    data = D.load_fashion_mnist(tmp_path / "fm")
    assert data.train_images.shape == (30, 1, 32, 32) and data.test_images.shape == (12, 1, 32, 32)
    assert data.train_images.dtype == torch.uint8 and data.name == "fashion_mnist"
    images = written["train-images-idx3-ubyte"]
    assert torch.equal(data.train_images[:, 0, 2:30, 2:30], torch.from_numpy(images)), "the 28x28 image, centred"
    assert data.train_images[:, :, :2].sum() == 0 and data.train_images[:, :, :, 30:].sum() == 0, "padding is black"
    assert data.train_labels.tolist() == written["train-labels-idx1-ubyte"].tolist()
    assert data.test_labels.dtype == torch.int64 and data.classes[9] == "Ankle boot"
    pixels = data.train_images.double() / 255
    assert data.mean[0] == pytest.approx(float(pixels.mean())) and data.std[0] == pytest.approx(float(pixels.std()))


def test_fashion_mnist_layouts(tmp_path):
    write_fashion_mnist(tmp_path / "a" / "fashion-mnist")
    write_fashion_mnist(tmp_path / "b" / "FashionMNIST" / "raw", gz=False)  # torchvision's folder
    for root in ("a", "b"):
        assert len(D.load_fashion_mnist(tmp_path / root).train_labels) == 40


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lacks train-images-idx3-ubyte.gz, .*t10k-labels-idx1-ubyte.gz\. "
                                                r"Nothing is downloaded.*apt-get install dataset-fashion-mnist puts "
                                                r"them in /usr/share/datasets/fashion-mnist.*zalandoresearch"):
        D.load_fashion_mnist(tmp_path)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: gzip.compress(raw)[:-30], r"is not a readable IDX file"),  # a truncated download
    (lambda raw: raw, r"is not a readable IDX file \(Not a gzipped file"),  # plain bytes named .gz
    (lambda raw: gzip.compress(raw[:-5]), r"is truncated or damaged: its header gives shape \(40, 28, 28\)"),
    (lambda raw: gzip.compress(b"\x00\x00\x0d\x03" + raw[4:]), r"is not an IDX file of unsigned bytes \(it starts "
                                                                r"with 00000d03"),
    (lambda raw: gzip.compress(b""), r"is not an IDX file of unsigned bytes \(it starts with nothing"),
], ids=["truncated-gzip", "not-gzip", "truncated-data", "float-idx", "empty"])
def test_damaged_idx_file_is_named(tmp_path, damage, message):
    arrays = write_fashion_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(damage(idx_bytes(arrays["train-images-idx3-ubyte"])))
    with pytest.raises(ValueError, match=rf"{__import__('re').escape(str(path))} {message}"):
        D.load_fashion_mnist(tmp_path)


def test_fashion_mnist_labels_must_match_images(tmp_path):
    write_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(5, np.uint8))))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: expected N 28x28 images and N labels in 0..9, got "
                                         r"images \(24, 28, 28\) and labels \(5,\)"):
        D.load_fashion_mnist(tmp_path)


# -- an image folder ----------------------------------------------------------------------------------
def test_image_folder_holds_out_every_fifth_image(tmp_path):
    pytest.importorskip("PIL", reason="the image folder is read with Pillow")
    written = write_image_folder(tmp_path, per_class=6)
    data = D.load_image_folder(tmp_path, size=16)
    assert data.classes == ("cat", "dog", "emu") and data.name == "folder"
    assert data.train_images.shape == (15, 3, 16, 16) and data.test_images.shape == (3, 3, 16, 16)
    assert data.train_labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5 and data.test_labels.tolist() == [0, 1, 2]
    from PIL import Image

    expected = np.array(Image.fromarray(written["dog"][4]).resize((16, 16), Image.BILINEAR))
    assert torch.equal(data.test_images[1], torch.from_numpy(expected).permute(2, 0, 1)), "04.png of dog is held out"
    assert len(data.mean) == 3 and all(0 < s < 1 for s in data.std)


def test_image_folder_with_train_and_test(tmp_path):
    pytest.importorskip("PIL", reason="the image folder is read with Pillow")
    write_image_folder(tmp_path / "train", classes=("a", "b"), per_class=4)
    write_image_folder(tmp_path / "val", classes=("a", "b"), per_class=2, seed=1)
    data = D.load_dataset("folder", tmp_path)
    assert (len(data.train_labels), len(data.test_labels)) == (8, 4) and data.classes == ("a", "b")
    assert data.train_images.shape[1:] == (3, 32, 32), "resized to the registered VGG's input"


def test_image_folder_errors(tmp_path):
    pytest.importorskip("PIL", reason="the image folder is read with Pillow")
    with pytest.raises(FileNotFoundError, match="must hold one sub-folder of images per class"):
        D.load_image_folder(tmp_path / "nothing")
    write_image_folder(tmp_path / "one", classes=("only",))
    with pytest.raises(FileNotFoundError, match=r"at least two"):
        D.load_image_folder(tmp_path / "one")
    write_image_folder(tmp_path / "split" / "train", classes=("a", "b"))
    with pytest.raises(FileNotFoundError, match=r"has train/ but no test/ \(or val/\) folder"):
        D.load_image_folder(tmp_path / "split")
    write_image_folder(tmp_path / "bad", classes=("a", "b"))
    (tmp_path / "bad" / "b" / "07.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=rf"{__import__('re').escape(str(tmp_path / 'bad' / 'b' / '07.png'))} is not "
                                         r"a readable image"):
        D.load_image_folder(tmp_path / "bad")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    write_image_folder(tmp_path / "empty", classes=("b",))
    with pytest.raises(ValueError, match=r"empty/a holds no image"):
        D.load_image_folder(tmp_path / "empty")


# -- selection and batches ----------------------------------------------------------------------------
def test_subset_is_class_balanced_and_fixed(tmp_path):
    write_fashion_mnist(tmp_path, train=200, test=50)
    data = D.load_fashion_mnist(tmp_path)
    assert np.bincount(data.train_labels.numpy(), minlength=10).min() >= 3, "the written set has 3 of each class"
    small = data.subset(train=30, test=20)
    assert np.bincount(small.train_labels.numpy(), minlength=10).tolist() == [3] * 10, "classes take turns"
    assert np.bincount(small.test_labels.numpy(), minlength=10).max() <= 3
    again = data.subset(train=30, test=20)
    assert torch.equal(small.train_images, again.train_images), "the same selection every time"
    assert torch.equal(small.test_labels, again.test_labels) and len(small.test_labels) == 20
    assert data.subset() is not data and torch.equal(data.subset().train_labels, data.train_labels)
    with pytest.raises(ValueError, match=r"train_subset \(201\) exceeds the 200 train images of fashion_mnist"):
        data.subset(train=201)
    with pytest.raises(ValueError, match=r"test_subset \(0\) must be an int >= 1"):
        data.subset(test=0)


def test_normalize_repeats_grey_into_rgb():
    grey = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    x = D.normalize(grey, (0.5,), (0.25,))
    assert x.shape == (4, 3, 8, 8) and torch.equal(x[:, 0], x[:, 2])
    assert torch.allclose(x[:, 1], (grey[:, 0].float() / 255 - 0.5) / 0.25)
    rgb = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.allclose(D.normalize(rgb)[:, 2], (rgb[:, 2].float() / 255 - D.CIFAR10_MEAN[2]) / D.CIFAR10_STD[2])


def test_find_dataset_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"dataset \('mnist'\) must be one of \('cifar10', 'fashion_mnist', "
                                         r"'folder'\)"):
        D.find_dataset("mnist")
    with pytest.raises(ValueError, match=r"data \(None\) must be the image folder for dataset 'folder'"):
        D.find_dataset("folder")
    write_fashion_mnist(tmp_path)
    assert D.find_dataset("fashion_mnist", tmp_path) == (tmp_path, D.FASHION_MNIST_CLASSES)
