"""The data checks of robust_train.data.validate, directly and through the data modules that call them: each
problem is a ConfigError whose single-line message names the source, the problem and the fix."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from robust_train.data import CIFAR10Data, ImageFolderData, MNISTData
from robust_train.data.validate import (
    check_images_and_labels,
    read_npz,
    to_labels,
    to_uint8_nchw,
)
from robust_train.errors import ConfigError

SRC = "/data/cifar.npz"
CIFAR = {"in_channels": 3, "image_size": (32, 32), "num_classes": 10}


def images(n: int = 6, shape=(3, 32, 32), seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8))


def labels(n: int = 6) -> torch.Tensor:
    return torch.arange(n) % 10


def refused(match: str, fn, *args, **kwargs) -> str:
    """The ConfigError message of fn(*args): one line, naming the source and containing `match`."""
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    assert match in message, message
    assert ": " in message  # problem, then what to do
    return message


def with_value(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.float() / 255
    x[1, 2, 3, 4] = value
    return x


def test_valid_data_passes():
    check_images_and_labels(SRC, images(), labels(), **CIFAR)
    check_images_and_labels(SRC, images().float() / 255, labels(), **CIFAR)  # float in [0, 1] is fine too
    check_images_and_labels(SRC, images(3, (1, 28, 28)), torch.tensor([0, 9, 4]), 1, (28, 28), 10, "test")


@pytest.mark.parametrize("x, y, match", [
    (images(0), labels(0), "the training set is empty"),
    (with_value(images(), float("nan")), labels(), "1 NaN pixel value"),
    (with_value(images(), float("inf")), labels(), "1 infinite pixel value"),
    (with_value(images(), -float("inf")), labels(), "1 infinite pixel value"),
    (with_value(images(), 1.5), labels(), "float pixels in [0, 1.5], outside [0, 1]"),
    (images().long() * 2, labels(), "integer pixels in [0, 510], outside 0-255"),
    (images(shape=(1, 32, 32)), labels(), "1-channel 32x32 images, but this data set needs 3-channel 32x32"),
    (images(shape=(3, 28, 28)), labels(), "3-channel 28x28 images"),
    (images(shape=(32, 32, 3)), labels(), "channels-last"),
    (images()[:, 0], labels(), "not a stack of images"),
    (images(), torch.tensor([0, 1, 2, 10, 4, 5]), "1 of the 6 labels of the training set lie outside 0 .. 9"),
    (images(), torch.tensor([0, -1, 2, 3, 4, 5]), "(min -1, max 5)"),
    (images(), labels(5), "6 training images but 5 training labels"),
    (images(), labels().view(2, 3), "give one integer class label per image"),
    (images(), labels().float(), "integer class indices"),
])
def test_each_problem_is_refused(x, y, match):
    message = refused(match, check_images_and_labels, SRC, x, y, **CIFAR)
    assert message.startswith(SRC)


def test_split_is_named():
    refused("the test set is empty", check_images_and_labels, SRC, images(0), labels(0), **CIFAR, split="test")


def test_layout_and_float_conversion():
    x = images(4)
    hwc = x.permute(0, 2, 3, 1).numpy()
    assert torch.equal(to_uint8_nchw(SRC, "x_train", x.numpy(), 3, (32, 32)), x)
    assert torch.equal(to_uint8_nchw(SRC, "x_train", hwc, 3, (32, 32)), x)
    for dtype in (np.float32, np.float64, np.float16):
        assert torch.equal(to_uint8_nchw(SRC, "x_train", (hwc / 255).astype(dtype), 3, (32, 32)), x), dtype
    assert torch.equal(to_uint8_nchw(SRC, "x_train", hwc.astype(np.int64), 3, (32, 32)), x)
    out = to_uint8_nchw(SRC, "x_train", hwc, 3, (32, 32))
    assert out.dtype == torch.uint8 and out.is_contiguous()


def test_layout_is_checked_before_values():
    bad = np.full((2, 28, 28, 3), np.nan, dtype=np.float32)
    refused("3-channel 28x28 images", to_uint8_nchw, SRC, "x_train", bad, 3, (32, 32))
    nan = np.full((2, 32, 32, 3), np.nan, dtype=np.float32)
    refused("x_train has 6144 NaN pixel value(s)", to_uint8_nchw, SRC, "x_train", nan, 3, (32, 32))
    refused("x_test is empty", to_uint8_nchw, SRC, "x_test", np.zeros((0, 32, 32, 3), np.uint8), 3, (32, 32))
    refused("dtype <U1", to_uint8_nchw, SRC, "x_train", np.full((1, 3, 32, 32), "a"), 3, (32, 32))


def test_labels_from_a_file():
    assert to_labels(SRC, "y", np.array([[3], [1]], dtype=np.uint8)).tolist() == [3, 1]  # Keras' (N, 1)
    assert to_labels(SRC, "y", np.array([2.0, 0.0])).dtype == torch.long
    refused("non-integer labels", to_labels, SRC, "y_train", np.array([0.5, 1.0]))
    refused("non-integer labels", to_labels, SRC, "y_train", np.array([np.nan, 1.0]))
    refused("y_train has shape (2, 2)", to_labels, SRC, "y_train", np.zeros((2, 2), int))
    refused("dtype <U1", to_labels, SRC, "y_train", np.array(["a"]))


def test_read_npz_refuses_what_it_cannot_read(tmp_path):
    keys = ("x_train", "y_train")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    refused("cannot be read as an .npz file", read_npz, tmp_path / "garbage.npz", keys)
    np.save(tmp_path / "one.npy", np.zeros(3))
    refused("holds one array, not an .npz archive", read_npz, tmp_path / "one.npy", keys)
    np.savez(tmp_path / "partial.npz", x_train=np.zeros(3))
    refused("has no y_train array (it has: x_train)", read_npz, tmp_path / "partial.npz", keys)
    np.savez(tmp_path / "objects.npz", x_train=np.array([1, "a"], dtype=object), y_train=np.zeros(2))
    refused("no object arrays", read_npz, tmp_path / "objects.npz", keys)
    np.savez(tmp_path / "fine.npz", x_train=np.zeros(3), y_train=np.ones(2), extra=np.zeros(1))
    assert sorted(read_npz(tmp_path / "fine.npz", keys)) == ["x_train", "y_train"]


# --- through the data modules ---------------------------------------------------------------------------------

def cifar_npz(path, **change) -> str:
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (10, 3, 32, 32), dtype=np.uint8), "y_train": np.arange(10) % 10,
              "x_test": rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8), "y_test": np.arange(4)}
    arrays.update(change)
    np.savez(path, **arrays)
    return str(path)


def cifar(root: str) -> CIFAR10Data:
    dm = CIFAR10Data(root=root, val_size=2, augment=False)
    dm.setup()
    return dm


def test_cifar_float_and_channels_last_npz_equal_the_uint8_one(tmp_path):
    ref = cifar(cifar_npz(tmp_path / "uint8.npz"))
    x = np.load(tmp_path / "uint8.npz")["x_train"]
    for name, x_train in [("float.npz", (x / 255).astype(np.float32)), ("hwc.npz", x.transpose(0, 2, 3, 1)),
                          ("hwc_float.npz", x.transpose(0, 2, 3, 1) / 255)]:
        dm = cifar(cifar_npz(tmp_path / name, x_train=x_train))
        for a, b in [(ref.train_set, dm.train_set), (ref.val_set, dm.val_set), (ref.test_set, dm.test_set)]:
            assert a.images.dtype == b.images.dtype == torch.uint8
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels), name


@pytest.mark.parametrize("change, match", [
    ({"x_train": np.zeros((0, 32, 32, 3), np.uint8), "y_train": np.zeros(0, int)}, "x_train is empty"),
    ({"x_test": np.zeros((0, 3, 32, 32), np.uint8), "y_test": np.zeros(0, int)}, "x_test is empty"),
    ({"x_train": np.full((10, 32, 32, 3), np.nan, np.float32)}, "x_train has 30720 NaN"),
    ({"x_test": np.full((4, 3, 32, 32), np.inf)}, "x_test has 12288 infinite"),
    ({"x_train": np.full((10, 32, 32, 3), 255.0)}, "outside [0, 1]: divide 0-255 values by 255"),
    ({"x_train": np.zeros((10, 32, 32, 1), np.uint8)}, "1-channel 32x32 images"),
    ({"x_train": np.zeros((10, 28, 28, 3), np.uint8)}, "3-channel 28x28 images"),
    ({"y_train": np.full(10, 10)}, "10 of the 10 labels of the training set lie outside 0 .. 9"),
    ({"y_test": np.array([0, 1, 2, -1])}, "1 of the 4 labels of the test set lie outside 0 .. 9"),
    ({"y_train": np.zeros(9, int)}, "10 training images but 9 training labels"),
    ({"y_test": np.zeros(5, int)}, "4 test images but 5 test labels"),
])
def test_cifar_refuses_malformed_npz(tmp_path, change, match):
    path = cifar_npz(tmp_path / "bad.npz", **change)
    message = refused(match, cifar, path)
    assert message.startswith(path)


def test_imagefolder_without_images_is_refused_in_one_line(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "cat" / "a.png")
    dm = ImageFolderData(root=str(tmp_path))
    refused("no images found under", dm.setup)
    message = refused("classes dog", ImageFolderData(root=str(tmp_path)).setup)  # names the empty class
    assert ".png" in message and "Supported extensions" not in message


def test_tensor_datasets_checks_both_parts():
    dm = MNISTData(val_size=5)
    x, y = images(20, (1, 28, 28)), labels(20)
    train, val, test = dm.tensor_datasets((x, y), (x[:3], y[:3]), source="my-mnist")
    assert (len(train), len(val), len(test)) == (15, 5, 3)
    refused("my-mnist: 1 of the 3 labels of the test set", dm.tensor_datasets, (x, y),
            (x[:3], torch.tensor([0, 1, 10])), source="my-mnist")
    refused("mnist: the training set has shape", dm.tensor_datasets, (images(20), y), (x[:3], y[:3]))
